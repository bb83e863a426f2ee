//! Delta updates, publisher side: for a newly published version, the
//! per-source patches that rebuild its root file system and UKIs from each of
//! the newest earlier published versions, and their entries in `deltas.json`
//! (see `os_format::delta` and docs/update-flow.md "Delta updates").
//!
//! A patch is one zstd frame of the result compressed with the whole source
//! as its prefix (`zstd --patch-from`), with long-distance matching and a
//! window that reaches back to the start of the source. Sources are the
//! repository's own target files of the older version, each checked against
//! the length and sha256 of the targets metadata publish loaded through TUF,
//! then decompressed in memory and checked against that version's manifest;
//! results are the build's artifacts, uncompressed and checked the same way.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use os_format::delta::{
    patch_target_name, patch_window_log, Delta, DeltaIndex, Patch, PatchFormat, PatchKind,
    DELTA_INDEX_TARGET,
};
use os_format::layout::Slot;
use os_format::manifest::{Artifact, ArtifactKind, BuildManifest, Compression};
use os_format::update_manifest::{Update, Version};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tough::Repository;

use super::BUILD_UPDATE_DIR;
use crate::error::{BuildError, Result};

/// zstd level of a patch (long-distance matching on). Measured on our
/// qemu-x86_64 roots (161 MB erofs, tests/bench/delta.sh), root patch bytes
/// and seconds for the agent / openssl / kernel changes: level 3: 102 KB
/// 0.33 s / 2.04 MB 0.39 s / 14.8 MB 0.54 s; level 6: 90 KB 0.48 s / 1.94 MB
/// 0.49 s / 13.9 MB 1.09 s; level 9: 90 KB 0.70 s / 1.93 MB 0.94 s / 13.5 MB
/// 1.55 s; level 12 saves under 1.5 % more at 2-4 s. Level 6 is where more
/// time stops buying size. See docs/update-flow.md "Delta updates".
pub const DEFAULT_PATCH_LEVEL: i32 = 6;

/// Keep a patch only when it saves at least a tenth of the full download
/// of the artifact it rebuilds.
pub(crate) fn worth_shipping(patch_size: u64, full_size: u64) -> bool {
    patch_size.saturating_mul(10) <= full_size.saturating_mul(9)
}

/// The versions to publish deltas from: the `count` newest entries below
/// `version` (`updates` lowest version first, as `updates_for` gives them).
pub(crate) fn delta_sources<'a>(
    updates: &[&'a Update],
    version: &Version,
    count: usize,
) -> Vec<&'a Update> {
    let mut older: Vec<&Update> = updates
        .iter()
        .copied()
        .filter(|update| &update.version < version)
        .collect();
    older.sort_by(|left, right| right.version.cmp(&left.version));
    older.truncate(count);
    older
}

/// What a delta holds: each patch kind with the source artifact (of the
/// older version) and the result artifact (of the new one). The UKI of the
/// inactive slot is rebuilt from the booted slot's, both ways.
pub(crate) fn planned_patches() -> [(PatchKind, ArtifactKind, ArtifactKind); 3] {
    [
        (
            PatchKind::RootFilesystem,
            ArtifactKind::RootFilesystem,
            ArtifactKind::RootFilesystem,
        ),
        (
            PatchKind::KernelImage {
                source_slot: Slot::A,
                slot: Slot::B,
            },
            ArtifactKind::KernelImage { slot: Slot::A },
            ArtifactKind::KernelImage { slot: Slot::B },
        ),
        (
            PatchKind::KernelImage {
                source_slot: Slot::B,
                slot: Slot::A,
            },
            ArtifactKind::KernelImage { slot: Slot::B },
            ArtifactKind::KernelImage { slot: Slot::A },
        ),
    ]
}

/// An artifact's file name without its compression suffix (`root.erofs`).
pub(crate) fn uncompressed_name(artifact: &Artifact) -> &str {
    match artifact.compression {
        Compression::Zstd => artifact.name.strip_suffix(".zst").unwrap_or(&artifact.name),
        Compression::None => &artifact.name,
    }
}

/// The patch's own bytes, as written.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct PatchFile {
    pub size: u64,
    pub sha256: String,
    pub window_log: u32,
}

/// Counts and hashes what passes through to the file.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buffer)?;
        self.hasher.update(&buffer[..written]);
        self.written += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Write a patch to `output`: `result` (`result_size` bytes) compressed at
/// `level` with `source` as the zstd prefix, long-distance matching, the
/// window of `patch_window_log`, the result's size and a checksum in the frame.
pub(crate) fn write_patch(
    source: &[u8],
    result: &mut dyn Read,
    result_size: u64,
    output: &Path,
    level: i32,
) -> Result<PatchFile> {
    let window_log = patch_window_log(source.len() as u64, result_size);
    let file = fs::File::create(output).map_err(BuildError::io(output))?;
    let writer = HashingWriter {
        inner: io::BufWriter::with_capacity(1 << 20, file),
        hasher: Sha256::new(),
        written: 0,
    };
    let setup = |writer| -> io::Result<zstd::stream::write::Encoder<'_, HashingWriter<_>>> {
        let mut encoder = zstd::stream::write::Encoder::with_ref_prefix(writer, level, source)?;
        encoder.window_log(window_log)?;
        encoder.long_distance_matching(true)?;
        encoder.include_checksum(true)?;
        encoder.include_contentsize(true)?;
        encoder.set_pledged_src_size(Some(result_size))?;
        Ok(encoder)
    };
    let mut encoder = setup(writer).map_err(BuildError::io(output))?;
    let copied = io::copy(result, &mut encoder).map_err(BuildError::io(output))?;
    if copied != result_size {
        return Err(BuildError::repository(
            output.display().to_string(),
            format!("the result had {copied} bytes, expected {result_size}"),
        ));
    }
    let mut writer = encoder.finish().map_err(BuildError::io(output))?;
    writer.flush().map_err(BuildError::io(output))?;
    writer
        .inner
        .into_inner()
        .map_err(|error| BuildError::io(output)(error.into_error()))?
        .sync_all()
        .map_err(BuildError::io(output))?;
    Ok(PatchFile {
        size: writer.written,
        sha256: hex::encode(writer.hasher.finalize()),
        window_log,
    })
}

/// Decompress `bytes` (an artifact as shipped) and check the result against
/// the artifact's uncompressed size and sha256.
fn uncompressed_bytes(what: &str, artifact: &Artifact, bytes: Vec<u8>) -> Result<Vec<u8>> {
    let data = match artifact.compression {
        Compression::None => bytes,
        Compression::Zstd => {
            let mut data = Vec::with_capacity(artifact.uncompressed_size as usize);
            zstd::stream::read::Decoder::new(bytes.as_slice())
                .and_then(|mut decoder| decoder.read_to_end(&mut data))
                .map_err(|error| {
                    BuildError::repository(what, format!("cannot be decompressed: {error}"))
                })?;
            data
        }
    };
    let sha256 = hex::encode(Sha256::digest(&data));
    if data.len() as u64 != artifact.uncompressed_size || sha256 != artifact.uncompressed_sha256 {
        return Err(BuildError::repository(
            what,
            format!(
                "decompressed to {} bytes with sha256 {sha256}; the manifest says {} bytes with sha256 {}",
                data.len(),
                artifact.uncompressed_size,
                artifact.uncompressed_sha256
            ),
        ));
    }
    Ok(data)
}

/// Read the delta index target, if the repository has one.
pub async fn read_delta_index(repository: &Repository) -> Result<DeltaIndex> {
    let Some(bytes) = super::read_optional_target(repository, DELTA_INDEX_TARGET).await? else {
        return Ok(DeltaIndex::new());
    };
    DeltaIndex::from_json(DELTA_INDEX_TARGET, &bytes)
        .map_err(|error| BuildError::repository(DELTA_INDEX_TARGET, error.to_string()))
}

/// Each signed target's length and sha256 (hex), by name: from the targets
/// metadata the publisher loaded and verified through TUF.
pub(crate) type SignedTargets = HashMap<String, (u64, String)>;

/// The source artifacts of one version, uncompressed.
type SourceBytes = Vec<(ArtifactKind, Vec<u8>)>;

/// Read `update`'s artifacts of `kinds` from the repository's target files
/// (`<sha256>.<name>`, consistent snapshots), each checked against its signed
/// length and sha256 before it is decompressed and checked against the
/// manifest's uncompressed size and sha256.
fn read_sources(
    targets_dir: &Path,
    signed: &SignedTargets,
    update: &Update,
    kinds: &[ArtifactKind],
) -> Result<SourceBytes> {
    kinds
        .iter()
        .map(|kind| {
            let target = update.target(*kind).ok_or_else(|| {
                BuildError::repository(
                    format!("{} {}", update.variant, update.version),
                    format!("has no {kind:?} target"),
                )
            })?;
            let (length, sha256) = signed.get(&target.target).ok_or_else(|| {
                BuildError::repository(&target.target, "is not signed in this repository")
            })?;
            let path = targets_dir.join(format!("{sha256}.{}", target.target));
            let bytes = fs::read(&path).map_err(BuildError::io(&path))?;
            let actual = hex::encode(Sha256::digest(&bytes));
            if bytes.len() as u64 != *length || &actual != sha256 {
                return Err(BuildError::repository(
                    path.display().to_string(),
                    format!(
                        "has {} bytes with sha256 {actual}; the signed targets metadata says {length} bytes with sha256 {sha256}",
                        bytes.len()
                    ),
                ));
            }
            Ok((*kind, uncompressed_bytes(&target.target, &target.artifact, bytes)?))
        })
        .collect()
}

/// Read one version's sources on a thread of their own.
fn spawn_source_reader(
    targets_dir: &Path,
    signed: &Arc<SignedTargets>,
    update: &Update,
    kinds: Vec<ArtifactKind>,
) -> std::thread::JoinHandle<Result<SourceBytes>> {
    let (targets_dir, signed, update) = (targets_dir.to_path_buf(), signed.clone(), update.clone());
    std::thread::spawn(move || read_sources(&targets_dir, &signed, &update, &kinds))
}

fn joined<T>(thread: std::thread::JoinHandle<Result<T>>, what: &str) -> Result<T> {
    thread
        .join()
        .map_err(|_| BuildError::Other(format!("the thread {what} panicked")))?
}

/// The build's artifacts that patches rebuild, uncompressed in memory, each
/// checked against the build's manifest.
type ResultBytes = Vec<(ArtifactKind, Vec<u8>)>;

fn read_results(build_dir: &Path, artifacts: &[Artifact]) -> Result<ResultBytes> {
    artifacts
        .iter()
        .map(|artifact| {
            let shipped = build_dir.join(BUILD_UPDATE_DIR).join(&artifact.name);
            let bytes = fs::read(&shipped).map_err(BuildError::io(&shipped))?;
            let data = uncompressed_bytes(&shipped.display().to_string(), artifact, bytes)?;
            Ok((artifact.kind, data))
        })
        .collect()
}

/// One patch in the publish report: shipped (with its target) or skipped (with why).
#[derive(Debug, Serialize)]
pub struct PatchReport {
    /// What it rebuilds: `root.erofs`, `uki-b.efi from uki-a.efi`.
    pub rebuilds: String,
    pub target: Option<String>,
    pub size: u64,
    /// The compressed artifact a full install downloads instead.
    pub full_size: u64,
    pub seconds: f64,
    pub skipped: Option<String>,
}

/// The delta from one earlier version.
#[derive(Debug, Serialize)]
pub struct DeltaReport {
    pub from_version: String,
    /// Why there is no delta from this version, if there is none.
    pub skipped: Option<String>,
    pub patches: Vec<PatchReport>,
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// The publish report's delta lines, one per source version and patch.
pub fn report_lines(reports: &[DeltaReport]) -> Vec<String> {
    let mut lines = Vec::new();
    for report in reports {
        match &report.skipped {
            Some(why) => lines.push(format!("no delta from {}: {why}", report.from_version)),
            None => lines.push(format!("delta from {}:", report.from_version)),
        }
        for patch in &report.patches {
            let verdict = match &patch.skipped {
                Some(why) => format!("skipped: {why}"),
                None => "shipped".to_string(),
            };
            lines.push(format!(
                "  {}: {} of {} bytes ({:.2} %) in {:.1} s, {verdict}",
                patch.rebuilds,
                patch.size,
                patch.full_size,
                percent(patch.size, patch.full_size),
                patch.seconds
            ));
        }
    }
    lines
}

/// What `compute` hands to the repository change.
pub(crate) struct DeltaOutcome {
    pub deltas: Vec<Delta>,
    /// Patch files: (target name, path, size, sha256).
    pub new_targets: Vec<(String, PathBuf, u64, String)>,
    pub reports: Vec<DeltaReport>,
}

pub(crate) struct DeltaJob<'a> {
    /// The live repository's `targets/`, and what its targets metadata signs.
    pub targets_dir: &'a Path,
    pub signed: SignedTargets,
    pub sources: &'a [&'a Update],
    pub update: &'a Update,
    pub build: &'a BuildManifest,
    pub build_dir: &'a Path,
    /// Where decompressed results and patches go (outside the repository).
    pub scratch: &'a Path,
    pub level: i32,
}

fn describe(source: &Artifact, result: &Artifact) -> String {
    let (source, result) = (uncompressed_name(source), uncompressed_name(result));
    if source == result {
        result.to_string()
    } else {
        format!("{result} from {source}")
    }
}

/// The patches from each source version to the new one.
pub(crate) fn compute(job: &DeltaJob<'_>) -> Result<DeltaOutcome> {
    // The results are decompressed on a second thread while the first
    // source is read.
    let wanted: Vec<Artifact> = job
        .build
        .artifacts
        .iter()
        .filter(|artifact| {
            planned_patches()
                .iter()
                .any(|(_, _, result_kind)| *result_kind == artifact.kind)
        })
        .cloned()
        .collect();
    let build_dir = job.build_dir.to_path_buf();
    let mut pending = (!job.sources.is_empty())
        .then(|| std::thread::spawn(move || read_results(&build_dir, &wanted)));
    let mut results: Option<ResultBytes> = None;
    let mut outcome = DeltaOutcome {
        deltas: Vec::new(),
        new_targets: Vec::new(),
        reports: Vec::new(),
    };
    // Each version's sources are read on a thread while the previous
    // version's patches are computed.
    let signed = Arc::new(job.signed.clone());
    let source_kinds = |source: &Update| -> Vec<ArtifactKind> {
        planned_patches()
            .iter()
            .filter(|(_, source_kind, result_kind)| {
                source.target(*source_kind).is_some()
                    && job
                        .build
                        .artifacts
                        .iter()
                        .any(|artifact| artifact.kind == *result_kind)
            })
            .map(|(_, source_kind, _)| *source_kind)
            .collect()
    };
    let mut next_sources = job
        .sources
        .first()
        .map(|source| spawn_source_reader(job.targets_dir, &signed, source, source_kinds(source)));
    for (index, source) in job.sources.iter().enumerate() {
        let mut report = DeltaReport {
            from_version: source.version.to_string(),
            skipped: None,
            patches: Vec::new(),
        };
        let spinner = crate::progress::stage_spinner(&format!(
            "reading {} {} from the repository",
            source.variant, source.version
        ));
        let reading = Instant::now();
        let read = joined(
            next_sources.take().expect("a reader per source"),
            "reading a source version",
        );
        spinner.finish_and_clear();
        next_sources = job
            .sources
            .get(index + 1)
            .map(|next| spawn_source_reader(job.targets_dir, &signed, next, source_kinds(next)));
        // A version whose targets cannot be read (or do not decompress to
        // what its manifest says) gets no delta.
        let sources = match read {
            Ok(sources) => {
                tracing::debug!(
                    from = %source.version,
                    seconds = reading.elapsed().as_secs_f64(),
                    "sources read and decompressed"
                );
                sources
            }
            Err(error) => {
                tracing::warn!(from = %source.version, %error, "no delta from this version");
                report.skipped = Some(format!("its targets are not usable: {error}"));
                outcome.reports.push(report);
                continue;
            }
        };
        let mut patches = Vec::new();
        for (kind, source_kind, result_kind) in planned_patches() {
            let Some(source_target) = source.target(source_kind) else {
                continue;
            };
            let Some((_, source_bytes)) = sources.iter().find(|(read, _)| *read == source_kind)
            else {
                continue;
            };
            if let Some(thread) = pending.take() {
                let waiting = Instant::now();
                results = Some(joined(thread, "decompressing the build's artifacts")?);
                tracing::debug!(
                    seconds = waiting.elapsed().as_secs_f64(),
                    "waited for the build's artifacts"
                );
            }
            let Some(result_artifact) = job
                .build
                .artifacts
                .iter()
                .find(|artifact| artifact.kind == result_kind)
            else {
                continue;
            };
            let Some((_, result_bytes)) = results
                .iter()
                .flatten()
                .find(|(kind, _)| *kind == result_kind)
            else {
                continue;
            };
            let rebuilds = describe(&source_target.artifact, result_artifact);
            let full_size = result_artifact.size;
            let target = patch_target_name(
                &job.update.variant,
                &job.update.version,
                &source.version,
                uncompressed_name(result_artifact),
            );
            let path = job.scratch.join(&target);
            let bar = crate::progress::bytes_bar(
                result_artifact.uncompressed_size,
                &format!("patch {rebuilds} from {}", source.version),
            );
            let started = Instant::now();
            let mut reader = bar.wrap_read(result_bytes.as_slice());
            let written = write_patch(
                source_bytes,
                &mut reader,
                result_artifact.uncompressed_size,
                &path,
                job.level,
            )?;
            bar.finish_and_clear();
            let seconds = started.elapsed().as_secs_f64();
            let shipped = worth_shipping(written.size, full_size);
            tracing::info!(
                from = %source.version,
                %rebuilds,
                size = written.size,
                full_size,
                seconds,
                shipped,
                "patch"
            );
            report.patches.push(PatchReport {
                rebuilds,
                target: shipped.then(|| target.clone()),
                size: written.size,
                full_size,
                seconds,
                skipped: (!shipped).then(|| {
                    format!(
                        "{} bytes is not clearly smaller than the full {} bytes",
                        written.size, full_size
                    )
                }),
            });
            if !shipped {
                fs::remove_file(&path).map_err(BuildError::io(&path))?;
                continue;
            }
            patches.push((
                Patch {
                    target: target.clone(),
                    format: PatchFormat::ZstdPatchFrom,
                    kind,
                    size: written.size,
                    sha256: written.sha256.clone(),
                    source_size: source_target.artifact.uncompressed_size,
                    source_sha256: source_target.artifact.uncompressed_sha256.clone(),
                    result_size: result_artifact.uncompressed_size,
                    result_sha256: result_artifact.uncompressed_sha256.clone(),
                    window_log: written.window_log,
                },
                path,
            ));
        }
        if patches.is_empty() {
            if report.skipped.is_none() {
                report.skipped = Some("no patch is clearly smaller than the full download".into());
            }
        } else {
            outcome.deltas.push(Delta {
                variant: job.update.variant.clone(),
                arch: job.update.arch,
                from_version: source.version.clone(),
                to_version: job.update.version.clone(),
                from_root_hash: source.verity.root_hash.clone(),
                patches: patches.iter().map(|(patch, _)| patch.clone()).collect(),
            });
            for (patch, path) in patches {
                outcome
                    .new_targets
                    .push((patch.target, path, patch.size, patch.sha256));
            }
        }
        outcome.reports.push(report);
    }
    Ok(outcome)
}

/// The index after publishing `update`: entries to it replaced by `deltas`.
pub(crate) fn updated_index(
    mut index: DeltaIndex,
    update: &Update,
    deltas: Vec<Delta>,
) -> DeltaIndex {
    index.deltas.retain(|delta| {
        !(delta.variant == update.variant
            && delta.arch == update.arch
            && delta.to_version == update.version)
    });
    index.deltas.extend(deltas);
    index
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(value: &str) -> Version {
        Version::parse(value).unwrap()
    }

    /// Deterministic bytes that do not compress on their own.
    fn noise(seed: u64, length: usize) -> Vec<u8> {
        let mut state = seed | 1;
        (0..length)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    /// Write a patch of `result` from `source` at `level`; its file's bytes too.
    fn patch(source: &[u8], result: &[u8], level: i32) -> (PatchFile, Vec<u8>) {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("patch");
        let mut reader = result;
        let written = write_patch(source, &mut reader, result.len() as u64, &path, level).unwrap();
        (written, fs::read(&path).unwrap())
    }

    /// What the node does: the source as a referenced prefix, the decoder's
    /// window limit at `window_log_max`.
    fn apply(bytes: &[u8], source: &[u8], window_log_max: u32) -> io::Result<Vec<u8>> {
        let mut decoder = zstd::stream::read::Decoder::with_ref_prefix(bytes, source)?;
        decoder.window_log_max(window_log_max)?;
        let mut decoded = Vec::new();
        decoder.read_to_end(&mut decoded).map(|_| decoded)
    }

    #[test]
    fn a_patch_decodes_with_the_source_as_prefix_to_the_exact_result() {
        // 3 MiB of source; the result moves a block, changes a few bytes and
        // adds new ones: a window of 8 MiB (2^23) reaches the whole source.
        let source = noise(1, 3 << 20);
        let mut result = source[1 << 20..].to_vec();
        result.extend_from_slice(&source[..1 << 20]);
        result[12_345] ^= 0xff;
        result.extend_from_slice(&noise(2, 4096));
        let (written, bytes) = patch(&source, &result, 3);
        assert_eq!(written.window_log, 23);
        assert_eq!(written.size, bytes.len() as u64);
        assert_eq!(written.sha256, hex::encode(Sha256::digest(&bytes)));
        assert!(
            bytes.len() < 64 * 1024,
            "{} bytes: the patch reuses the source",
            bytes.len()
        );
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&bytes).unwrap(),
            Some(result.len() as u64)
        );
        let decoded = apply(&bytes, &source, written.window_log).unwrap();
        assert!(decoded == result, "decodes to the exact result");

        // A wrong source is caught by the frame checksum or yields other bytes.
        let mut other = source.clone();
        other[2 << 20] ^= 1;
        assert!(
            apply(&bytes, &other, written.window_log).is_ok_and(|wrong| wrong != result)
                || apply(&bytes, &other, written.window_log).is_err()
        );
    }

    #[test]
    fn the_decoder_must_allow_the_window() {
        let source = noise(3, 100_000);
        let result = source.repeat(3);
        let (written, bytes) = patch(&source, &result, 1);
        assert_eq!(written.window_log, 19);
        // The frame's window is the result's 300 000 bytes: above 2^18.
        assert!(apply(&bytes, &source, 18).is_err());
        assert!(apply(&bytes, &source, written.window_log).unwrap() == result);
    }

    #[test]
    fn the_report_says_what_shipped_and_what_was_skipped_and_why() {
        let reports = [
            DeltaReport {
                from_version: "2.0.0".into(),
                skipped: None,
                patches: vec![
                    PatchReport {
                        rebuilds: "root.erofs".into(),
                        target: Some("x-3.0.0-from-2.0.0-root.erofs.zst-patch".into()),
                        size: 2_000_000,
                        full_size: 115_000_000,
                        seconds: 0.5,
                        skipped: None,
                    },
                    PatchReport {
                        rebuilds: "uki-b.efi from uki-a.efi".into(),
                        target: None,
                        size: 13_000_000,
                        full_size: 13_500_000,
                        seconds: 0.1,
                        skipped: Some("13000000 bytes is not clearly smaller".into()),
                    },
                ],
            },
            DeltaReport {
                from_version: "1.0.0".into(),
                skipped: Some("its qemu-x86_64-1.0.0-root.erofs.zst is not usable".into()),
                patches: Vec::new(),
            },
        ];
        assert_eq!(
            report_lines(&reports),
            [
                "delta from 2.0.0:",
                "  root.erofs: 2000000 of 115000000 bytes (1.74 %) in 0.5 s, shipped",
                "  uki-b.efi from uki-a.efi: 13000000 of 13500000 bytes (96.30 %) in 0.1 s, \
                 skipped: 13000000 bytes is not clearly smaller",
                "no delta from 1.0.0: its qemu-x86_64-1.0.0-root.erofs.zst is not usable",
            ]
        );
    }

    #[test]
    fn only_clearly_smaller_patches_ship() {
        assert!(worth_shipping(0, 100));
        assert!(worth_shipping(90, 100));
        assert!(!worth_shipping(91, 100));
        assert!(!worth_shipping(200, 100));
        assert!(!worth_shipping(1, 0));
        assert!(worth_shipping(4_900_000, 115_000_000));
    }

    fn update(value: &str) -> Update {
        let text = format!(
            r#"{{"variant":"qemu-x86_64","arch":"x86_64","version":"{value}","max_version":"{value}",
            "build_time":1,"published":"2026-12-01T00:00:00Z","kernel_version":"6.1",
            "verity":{{"root_hash":"{hash}","salt":"{hash}","hash_algorithm":"sha256",
            "data_block_size":4096,"hash_block_size":4096,"data_blocks":1}},
            "required_units":[],"waves":[],"targets":[]}}"#,
            hash = "a".repeat(64)
        );
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn sources_are_the_newest_lower_versions() {
        let entries: Vec<Update> = ["1.0.0", "1.1.0", "2.0.0", "2.1.0", "3.0.0"]
            .iter()
            .map(|value| update(value))
            .collect();
        let all: Vec<&Update> = entries.iter().collect();
        let picked = |version: &str, count| -> Vec<String> {
            delta_sources(&all, &super::tests::version(version), count)
                .iter()
                .map(|update| update.version.to_string())
                .collect()
        };
        assert_eq!(picked("3.0.0", 3), ["2.1.0", "2.0.0", "1.1.0"]);
        assert_eq!(picked("2.0.0", 3), ["1.1.0", "1.0.0"]);
        assert_eq!(picked("3.0.0", 0), Vec::<String>::new());
        // A replaced version (published again) is not its own source.
        assert_eq!(picked("2.1.0", 1), ["2.0.0"]);
    }

    #[test]
    fn a_republished_version_replaces_its_deltas_only() {
        let to = update("2.0.0");
        let delta = |from: &str, to: &str| Delta {
            variant: "qemu-x86_64".into(),
            arch: os_format::layout::Arch::X86_64,
            from_version: version(from),
            to_version: version(to),
            from_root_hash: "b".repeat(64),
            patches: Vec::new(),
        };
        let index = DeltaIndex {
            schema: os_format::delta::DELTA_INDEX_SCHEMA,
            deltas: vec![delta("1.0.0", "1.1.0"), delta("1.0.0", "2.0.0")],
        };
        let updated = updated_index(index, &to, vec![delta("1.1.0", "2.0.0")]);
        let pairs: Vec<(String, String)> = updated
            .deltas
            .iter()
            .map(|delta| (delta.from_version.to_string(), delta.to_version.to_string()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("1.0.0".to_string(), "1.1.0".to_string()),
                ("1.1.0".to_string(), "2.0.0".to_string())
            ]
        );
    }
}
