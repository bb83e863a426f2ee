//! Streaming one artifact into a slot partition, and checking a written slot.
//!
//! [`write_artifact`] reads an artifact (zstd-compressed or stored) from any
//! blocking `Read`, checks it against its manifest entry while it streams and
//! writes the uncompressed bytes into a partition of the disk:
//!
//! * the bytes as shipped are counted and sha256-hashed as they arrive; more than
//!   the signed `size` fails at once, fewer or a different sha256 fails at the end
//!   (a stored artifact whose `size`/`sha256` equal its `uncompressed_size`/
//!   `uncompressed_sha256`, which is how the daemon hands over what the fetcher
//!   decompressed, is hashed once: the bytes read are the bytes written);
//! * the uncompressed bytes are hashed too, never written past the signed
//!   `uncompressed_size` (which must fit the partition), and must match
//!   `uncompressed_size` and `uncompressed_sha256` at the end;
//! * memory is bounded: a few fixed [`BUFFER_SIZE`] buffers and zstd's window
//!   (at most 128 MiB, zstd's default decoder limit), nothing proportional to the
//!   artifact;
//! * reading (decompression, both hashes) runs on the calling thread, the writes
//!   on a second thread, buffers handed back and forth, so the two halves overlap
//!   like `zstd -dc | dd bs=1M` does;
//! * writes go to the partition's byte range of the disk only (`pwrite` at
//!   partition offset + position), in whole buffers, then `fdatasync`; whole
//!   aligned blocks through an `O_DIRECT` descriptor of the disk where the kernel
//!   takes it (no copy into the page cache, nothing cached to drop before the
//!   read-back), the rest through the page cache.
//!
//! The disk is a block device or a disk image file opened read-write without
//! truncation ([`open_disk_for_writing`]).
//!
//! Written bytes are not trusted until the whole artifact checked out: a failed
//! artifact leaves garbage in the partition, which is why the slot keeps its
//! "empty" PARTUUIDs while it is written (see [`crate::slots`]).
//!
//! A root written by [`write_root_artifact`] is checked by its dm-verity
//! tree, computed as it streams, against the signed root hash (instead of by
//! its sha256: the same one pass); the writing side keeps a CRC-32 of each
//! MiB written with `O_DIRECT`. [`check_streamed_slot`] then reads both
//! partitions back from the device and compares them with those CRCs, and
//! checks the hash tree on the disk against the root's. [`verify_slot`]
//! checks any slot by reading it back whole and recomputing its dm-verity
//! root hash: the root is read with `O_DIRECT` (from the device, whatever the
//! page cache holds) by a second thread, ahead of the hashing.

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

use os_format::layout::Slot;
use os_format::manifest::{Artifact, ArtifactKind, Compression, VerityInfo};
use os_format::verity::{
    self, root_hash_to_hex, RootHash, StreamedTree, StreamingTree, VerityError, VeritySuperblock,
    ALGORITHM, SUPERBLOCK_SIZE, VERITY_BLOCK_SIZE,
};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::slots::{PartitionRange, SlotPartitions};

/// Size of each buffer of uncompressed bytes (and of each `pwrite`). 1 MiB:
/// measured (tests/bench/install-throughput.sh) 1.8x faster than 4 MiB writes,
/// which made ext4 allocate 2 MiB page-cache folios that were slow to fill.
pub const BUFFER_SIZE: usize = 1 << 20;
/// Number of buffers circulating between the decompressing and the writing thread.
const BUFFER_COUNT: usize = 3;
/// Size of the buffer used to read the rest of a source after its data ended.
const DRAIN_BUFFER_SIZE: usize = 64 * 1024;

/// Alignment `O_DIRECT` needs of buffers, disk offsets and lengths (the
/// largest logical block size of the disks and file systems written).
const DIRECT_ALIGNMENT: usize = 4096;

/// A zeroed buffer whose start is [`DIRECT_ALIGNMENT`]-aligned, for
/// `O_DIRECT` reads and writes (moving it does not move its bytes).
struct AlignedBuffer {
    storage: Vec<u8>,
    start: usize,
    len: usize,
    /// The length it was made with.
    capacity: usize,
}

impl AlignedBuffer {
    fn new(len: usize) -> AlignedBuffer {
        let storage = vec![0u8; len + DIRECT_ALIGNMENT];
        let start = storage.as_ptr().align_offset(DIRECT_ALIGNMENT);
        AlignedBuffer {
            storage,
            start,
            len,
            capacity: len,
        }
    }

    /// Makes it `len` bytes long, at most the length it was made with.
    fn truncate_or_restore(&mut self, len: usize) {
        assert!(
            len <= self.capacity,
            "{len} bytes do not fit {}",
            self.capacity
        );
        self.len = len;
    }
}

impl std::ops::Deref for AlignedBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for AlignedBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// `disk` opened once more with `O_DIRECT` (reads and writes go to the
/// device, bypassing the page cache), where the kernel and file system allow
/// it; `None` otherwise (then the caller uses `disk` itself).
fn reopen_direct(disk: &File, write: bool) -> Option<File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let flags = rustix::fs::OFlags::DIRECT.bits() as i32;
    File::options()
        .read(!write)
        .write(write)
        .custom_flags(flags)
        .open(format!("/proc/self/fd/{}", disk.as_raw_fd()))
        .ok()
}

/// The part of `len` bytes at disk offset `at` that `O_DIRECT` can take:
/// whole aligned blocks, none if `at` is not aligned.
fn direct_len(at: u64, len: usize) -> usize {
    if at.is_multiple_of(DIRECT_ALIGNMENT as u64) {
        len - len % DIRECT_ALIGNMENT
    } else {
        0
    }
}

/// `O_DIRECT` refused these bytes (alignment, or not supported here).
fn direct_refused(error: &io::Error) -> bool {
    error.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error())
}

/// What [`write_artifact`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenArtifact {
    /// The artifact's name.
    pub name: String,
    /// The partition it was written to.
    pub partition: String,
    /// Bytes read from the source (its signed size).
    pub compressed_bytes: u64,
    /// Bytes written to the partition (its signed uncompressed size).
    pub uncompressed_bytes: u64,
    /// sha256 of the written bytes, lower-case hex (equal to the manifest's),
    /// when that is how they were checked ([`write_artifact`]).
    pub uncompressed_sha256: Option<String>,
    /// The dm-verity tree of the written bytes, when that is how they were
    /// checked ([`write_root_artifact`]); its root hash is the signed one.
    pub verity_tree: Option<StreamedTree>,
    /// The CRC-32 of each buffer written, when every byte went to the disk
    /// with `O_DIRECT` (so [`read_back`] can read them back from the device
    /// and compare); `None` if some went through the page cache.
    pub written_crcs: Option<WrittenCrcs>,
}

/// What [`write_artifact`] wrote into a partition, as CRC-32s of
/// [`BUFFER_SIZE`] pieces (4 bytes per MiB): enough to tell, reading it
/// back, that the disk kept every byte. The bytes themselves were checked
/// against the signature before they were written; this only catches a
/// disk or card that does not keep what it is given, so a CRC suffices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenCrcs {
    /// The partition written (its range on the disk).
    pub partition: PartitionRange,
    /// Bytes written from the partition's start.
    pub bytes: u64,
    /// The CRC-32 of each [`BUFFER_SIZE`] piece, the last one shorter.
    pub crcs: Vec<u32>,
}

/// Everything that can go wrong installing or checking a slot. Each names the
/// artifact (or slot) and says what was expected and what was found.
#[derive(Debug, Error)]
pub enum InstallError {
    /// The disk could not be opened.
    #[error("{path}: cannot open the disk for writing: {source}", path = path.display())]
    OpenDisk {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A digest in the manifest is not 64 hex digits.
    #[error("{artifact}: the manifest's {field} {value:?} is not 64 hex digits")]
    InvalidDigest {
        artifact: String,
        field: &'static str,
        value: String,
    },
    /// The artifact is not one that goes into a slot partition.
    #[error("{artifact}: a {kind:?} artifact is not written to a slot partition")]
    NotAPartitionArtifact {
        artifact: String,
        kind: ArtifactKind,
    },
    /// The signed uncompressed size does not fit the partition.
    #[error(
        "{artifact}: uncompressed size {uncompressed_size} bytes does not fit partition \
         {partition} ({partition_size} bytes)"
    )]
    TooLargeForPartition {
        artifact: String,
        partition: String,
        uncompressed_size: u64,
        partition_size: u64,
    },
    /// The partition lies (partly) past the end of the disk.
    #[error(
        "{artifact}: partition {partition} (bytes {offset}..{end}) extends past the end of the \
         disk ({disk_size} bytes)"
    )]
    PartitionOutsideDisk {
        artifact: String,
        partition: String,
        offset: u64,
        end: u64,
        disk_size: u64,
    },
    /// Reading the source failed (a download or file error, not bad content).
    #[error("{artifact}: reading failed after {offset} bytes: {source}")]
    Read {
        artifact: String,
        offset: u64,
        #[source]
        source: io::Error,
    },
    /// More bytes arrived than the signed size.
    #[error("{artifact}: is longer than its signed length {signed_size}")]
    LongerThanSigned { artifact: String, signed_size: u64 },
    /// The source ended before the signed size.
    #[error("{artifact}: truncated: expected {expected} bytes (its signed length), got {got}")]
    Truncated {
        artifact: String,
        expected: u64,
        got: u64,
    },
    /// The bytes as shipped do not have the signed sha256.
    #[error("{artifact}: sha256 mismatch: expected {expected}, got {got}")]
    Sha256Mismatch {
        artifact: String,
        expected: String,
        got: String,
    },
    /// zstd could not decode the (signed, intact) bytes.
    #[error(
        "{artifact}: zstd decompression failed after {uncompressed_offset} uncompressed bytes: \
         {source}"
    )]
    Decompress {
        artifact: String,
        uncompressed_offset: u64,
        #[source]
        source: io::Error,
    },
    /// Decompression produced more than the signed uncompressed size.
    #[error("{artifact}: uncompressed data is longer than its signed length {signed_size}")]
    UncompressedLongerThanSigned { artifact: String, signed_size: u64 },
    /// Decompression produced fewer bytes than the signed uncompressed size.
    #[error("{artifact}: uncompressed size mismatch: expected {expected} bytes, got {got}")]
    UncompressedSizeMismatch {
        artifact: String,
        expected: u64,
        got: u64,
    },
    /// The uncompressed bytes do not have the signed sha256.
    #[error("{artifact}: uncompressed sha256 mismatch: expected {expected}, got {got}")]
    UncompressedSha256Mismatch {
        artifact: String,
        expected: String,
        got: String,
    },
    /// The uncompressed bytes do not hash to the signed dm-verity root hash.
    #[error(
        "{artifact}: the uncompressed bytes do not match the signed dm-verity root hash: \
         expected {expected}, got {got}"
    )]
    UncompressedRootHashMismatch {
        artifact: String,
        expected: String,
        got: String,
    },
    /// Reading written bytes back from the disk failed.
    #[error(
        "slot {slot}: reading partition {partition} back at partition offset {offset} failed: \
         {source}"
    )]
    ReadBack {
        slot: Slot,
        partition: String,
        offset: u64,
        #[source]
        source: io::Error,
    },
    /// The disk returned other bytes than were written to it.
    #[error(
        "slot {slot}: partition {partition} does not hold what was written to it: the {len} \
         bytes at partition offset {offset} read back different (a failing disk or card?)"
    )]
    ReadBackMismatch {
        slot: Slot,
        partition: String,
        offset: u64,
        len: usize,
    },
    /// A write (or a write that would leave the partition) failed.
    #[error(
        "{artifact}: writing partition {partition} at partition offset {offset} failed: {source}"
    )]
    Write {
        artifact: String,
        partition: String,
        offset: u64,
        #[source]
        source: io::Error,
    },
    /// Flushing the written partition to the disk failed.
    #[error("{artifact}: syncing partition {partition} to the disk failed: {source}")]
    Sync {
        artifact: String,
        partition: String,
        #[source]
        source: io::Error,
    },
    /// The manifest's dm-verity parameters are unusable.
    #[error("slot {slot}: the manifest's dm-verity parameters are invalid: {reason}")]
    InvalidVerityInfo { slot: Slot, reason: String },
    /// A slot partition is too small for what the manifest describes.
    #[error(
        "slot {slot}: partition {partition} is {size} bytes; expected at least {needed} bytes for \
         {what}"
    )]
    SlotTooSmall {
        slot: Slot,
        partition: String,
        size: u64,
        needed: u64,
        what: &'static str,
    },
    /// The verity superblock written to the slot is not the manifest's.
    #[error(
        "slot {slot}: the verity superblock on {partition} does not match the manifest: {reason}"
    )]
    SuperblockMismatch {
        slot: Slot,
        partition: String,
        reason: String,
    },
    /// The root partition's data does not hash to the expected root hash.
    #[error(
        "slot {slot}: partition {partition} does not match the dm-verity root hash: expected {}, \
         got {} ({detail})",
        root_hash_to_hex(expected),
        root_hash_to_hex(found)
    )]
    RootHashMismatch {
        slot: Slot,
        partition: String,
        expected: RootHash,
        found: RootHash,
        /// What the check of the hash tree said.
        detail: String,
    },
    /// The root data is right but the hash tree on the verity partition is not.
    #[error("slot {slot}: the hash tree on partition {partition} is corrupt: {source}")]
    HashTreeCorrupt {
        slot: Slot,
        partition: String,
        #[source]
        source: VerityError,
    },
    /// Reading the slot back failed.
    #[error("slot {slot}: reading the written slot back failed: {source}")]
    VerifyRead {
        slot: Slot,
        #[source]
        source: VerityError,
    },
}

/// Opens a disk (block device or image file) for [`write_artifact`]: read-write,
/// never created, never truncated.
pub fn open_disk_for_writing(path: &Path) -> Result<File, InstallError> {
    File::options()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| InstallError::OpenDisk {
            path: path.to_path_buf(),
            source,
        })
}

/// The slot partition an artifact goes to: the root file system to `root-*`,
/// the hash tree to `verity-*`.
pub fn partition_for<'a>(
    artifact: &Artifact,
    slot: &'a SlotPartitions,
) -> Result<&'a PartitionRange, InstallError> {
    match artifact.kind {
        ArtifactKind::RootFilesystem => Ok(&slot.root),
        ArtifactKind::VerityHashTree => Ok(&slot.verity),
        kind => Err(InstallError::NotAPartitionArtifact {
            artifact: artifact.name.clone(),
            kind,
        }),
    }
}

/// A manifest digest as bytes.
fn parse_digest(
    artifact: &Artifact,
    field: &'static str,
    value: &str,
) -> Result<[u8; 32], InstallError> {
    let mut digest = [0u8; 32];
    hex::decode_to_slice(value, &mut digest).map_err(|_| InstallError::InvalidDigest {
        artifact: artifact.name.clone(),
        field,
        value: value.to_string(),
    })?;
    Ok(digest)
}

/// What the reader of the shipped bytes saw (shared by reference with the
/// reader, which the zstd decoder owns while it runs).
struct SourceState {
    /// The signed size.
    limit: u64,
    /// Bytes accepted so far (never more than `limit`).
    count: Cell<u64>,
    /// More than `limit` bytes arrived.
    over_long: Cell<bool>,
    /// The source itself returned an error.
    source_failed: Cell<bool>,
    /// sha256 of the accepted bytes; `None` when they are the bytes written
    /// (a stored artifact), which the writing side hashes anyway.
    hasher: Option<RefCell<Sha256>>,
}

impl SourceState {
    fn new(limit: u64, hash: bool) -> SourceState {
        SourceState {
            limit,
            count: Cell::new(0),
            over_long: Cell::new(false),
            source_failed: Cell::new(false),
            hasher: hash.then(|| RefCell::new(Sha256::new())),
        }
    }
}

/// Counts and hashes the shipped bytes; errors as soon as more than the signed
/// size arrives (it never asks the source for more than one byte past it).
struct SignedReader<'a, R> {
    inner: R,
    state: &'a SourceState,
}

impl<R: Read> Read for SignedReader<'_, R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let state = self.state;
        if state.over_long.get() {
            return Err(over_long_error());
        }
        if state.source_failed.get() {
            return Err(io::Error::other("reading the source failed before"));
        }
        let allowed = (state.limit - state.count.get()).saturating_add(1);
        let len = buffer
            .len()
            .min(usize::try_from(allowed).unwrap_or(usize::MAX));
        let got = match self.inner.read(&mut buffer[..len]) {
            Ok(got) => got,
            Err(error) => {
                if error.kind() != io::ErrorKind::Interrupted {
                    state.source_failed.set(true);
                }
                return Err(error);
            }
        };
        if got as u64 > state.limit - state.count.get() {
            state.over_long.set(true);
            return Err(over_long_error());
        }
        if let Some(hasher) = &state.hasher {
            hasher.borrow_mut().update(&buffer[..got]);
        }
        state.count.set(state.count.get() + got as u64);
        Ok(got)
    }
}

fn over_long_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "more bytes than the signed length",
    )
}

/// A buffer of uncompressed bytes on its way to the disk.
struct Chunk {
    buffer: AlignedBuffer,
    len: usize,
    /// Offset of the first byte inside the partition.
    position: u64,
}

/// Why the decompressing side stopped early.
enum PumpError {
    /// Reading the decoded stream failed at this uncompressed offset: a zstd
    /// error, or an error of the source (see [`SourceState`]).
    Decode(io::Error, u64),
    /// Decompression produced more than the signed uncompressed size.
    UncompressedTooLong,
    /// The writing thread stopped (it reports why).
    WriterGone,
}

/// How the reading side checks the uncompressed bytes it hands to the
/// writing side.
enum ContentHasher {
    /// Their sha256 (the manifest's `uncompressed_sha256`).
    Sha256(Sha256),
    /// Their dm-verity tree (the manifest's root hash), for a root whose
    /// data blocks are exactly its uncompressed bytes.
    VerityTree(StreamingTree),
}

impl ContentHasher {
    fn update(&mut self, bytes: &[u8]) -> Result<(), PumpError> {
        match self {
            ContentHasher::Sha256(hasher) => hasher.update(bytes),
            ContentHasher::VerityTree(tree) => tree
                .update(bytes)
                .map_err(|_| PumpError::UncompressedTooLong)?,
        }
        Ok(())
    }
}

/// What the reading side computed of the bytes it handed on.
enum ContentDigest {
    Sha256([u8; 32]),
    /// `Err`: fewer bytes than the tree's size (reported as a size mismatch).
    VerityTree(Result<StreamedTree, VerityError>),
}

/// What was written: the byte count, the digest the reading side computed,
/// and the writing side's CRCs if every byte went with `O_DIRECT`.
struct Written {
    bytes: u64,
    digest: ContentDigest,
    crcs: Option<PieceCrcs>,
}

/// Streams one artifact from `source` into `partition` of `disk` (see the
/// module documentation), calling `progress` with the number of shipped
/// (compressed) bytes read so far after every buffer.
///
/// `disk` must be open for reading and writing ([`open_disk_for_writing`]);
/// `partition` is where the artifact goes ([`partition_for`]). On success the
/// data is synced to the disk. On any error the partition holds garbage.
pub fn write_artifact<R: Read>(
    source: R,
    artifact: &Artifact,
    disk: &File,
    partition: &PartitionRange,
    progress: &mut dyn FnMut(u64),
) -> Result<WrittenArtifact, InstallError> {
    write_checked(source, artifact, None, disk, partition, progress)
}

/// [`write_artifact`] for a root file system whose manifest signs its
/// dm-verity tree (`verity`): when the tree's data blocks are exactly the
/// root's uncompressed bytes, those bytes are checked by their dm-verity
/// root hash, computed as they stream, instead of by their sha256 (one
/// sha256 pass either way; the root hash is what the kernel checks at boot),
/// and [`WrittenArtifact::verity_tree`] lets [`check_streamed_slot`] check
/// the hash tree written beside them without reading the root again.
/// Otherwise (a root longer than its tree, unusable parameters) it is
/// [`write_artifact`].
pub fn write_root_artifact<R: Read>(
    source: R,
    artifact: &Artifact,
    verity: &VerityInfo,
    disk: &File,
    partition: &PartitionRange,
    progress: &mut dyn FnMut(u64),
) -> Result<WrittenArtifact, InstallError> {
    let tree = verity_parameters(verity)
        .ok()
        .filter(|(_, _, data_bytes)| {
            artifact.kind == ArtifactKind::RootFilesystem
                && *data_bytes == artifact.uncompressed_size
        })
        .and_then(|(root_hash, salt, data_bytes)| {
            Some((StreamingTree::new(data_bytes, &salt).ok()?, root_hash))
        });
    write_checked(source, artifact, tree, disk, partition, progress)
}

fn write_checked<R: Read>(
    source: R,
    artifact: &Artifact,
    tree: Option<(StreamingTree, RootHash)>,
    disk: &File,
    partition: &PartitionRange,
    progress: &mut dyn FnMut(u64),
) -> Result<WrittenArtifact, InstallError> {
    let name = || artifact.name.clone();
    let expected_sha256 = parse_digest(artifact, "sha256", &artifact.sha256)?;
    let expected_uncompressed_sha256 = parse_digest(
        artifact,
        "uncompressed_sha256",
        &artifact.uncompressed_sha256,
    )?;
    let (hasher, expected_root_hash) = match tree {
        Some((tree, root_hash)) => (ContentHasher::VerityTree(tree), Some(root_hash)),
        None => (ContentHasher::Sha256(Sha256::new()), None),
    };
    if artifact.uncompressed_size > partition.size {
        return Err(InstallError::TooLargeForPartition {
            artifact: name(),
            partition: partition.name.clone(),
            uncompressed_size: artifact.uncompressed_size,
            partition_size: partition.size,
        });
    }
    let disk_size = {
        let mut handle = disk;
        handle.seek(SeekFrom::End(0))
    };
    let end = partition.offset.checked_add(partition.size);
    match (disk_size, end) {
        (Ok(disk_size), Some(end)) if end <= disk_size => {}
        (disk_size, _) => {
            return Err(InstallError::PartitionOutsideDisk {
                artifact: name(),
                partition: partition.name.clone(),
                offset: partition.offset,
                end: end.unwrap_or(u64::MAX),
                disk_size: disk_size.unwrap_or(0),
            })
        }
    }

    // A stored artifact whose shipped and uncompressed entries say the same
    // (length and sha256): the bytes read are the bytes written, hashed once
    // (by their sha256, or by their dm-verity tree against the signed root
    // hash, which checks the same bytes).
    let shipped_is_written = artifact.compression == Compression::None
        && artifact.size == artifact.uncompressed_size
        && expected_sha256 == expected_uncompressed_sha256;
    let state = SourceState::new(artifact.size, !shipped_is_written);
    let reader = SignedReader {
        inner: source,
        state: &state,
    };
    let limits = Limits {
        artifact,
        partition,
        disk,
    };
    let (pumped, written, drained) = match artifact.compression {
        Compression::None => {
            let mut reader = reader;
            let (pumped, written) = stream(&mut reader, &state, &limits, hasher, progress);
            let drained = drain_if_ok(&written, &mut reader);
            (pumped, written, drained)
        }
        Compression::Zstd => {
            let mut decoder = zstd::stream::read::Decoder::new(reader).map_err(|source| {
                InstallError::Decompress {
                    artifact: name(),
                    uncompressed_offset: 0,
                    source,
                }
            })?;
            let (pumped, written) = stream(&mut decoder, &state, &limits, hasher, progress);
            let mut rest = decoder.finish();
            let drained = drain_if_ok(&written, &mut rest);
            (pumped, written, drained)
        }
    };
    progress(state.count.get());

    // A failed write is final; otherwise the shipped bytes are judged first:
    // a bad download explains bad content.
    let written = written?;
    let source_error = |drain_error: Option<io::Error>| -> Option<InstallError> {
        if state.over_long.get() {
            return Some(InstallError::LongerThanSigned {
                artifact: name(),
                signed_size: artifact.size,
            });
        }
        if let Some(source) = drain_error.filter(|_| state.source_failed.get()) {
            return Some(InstallError::Read {
                artifact: name(),
                offset: state.count.get(),
                source,
            });
        }
        let count = state.count.get();
        if count < artifact.size {
            return Some(InstallError::Truncated {
                artifact: name(),
                expected: artifact.size,
                got: count,
            });
        }
        // Without a hasher of its own, every byte read was written: the
        // stream ended (neither too long nor short) and nothing failed.
        let got: [u8; 32] = match (&state.hasher, &written.digest) {
            (Some(hasher), _) => hasher.borrow().clone().finalize().into(),
            (None, ContentDigest::Sha256(sha256)) => *sha256,
            // Checked below against the signed root hash instead.
            (None, ContentDigest::VerityTree(_)) => return None,
        };
        (got != expected_sha256).then(|| InstallError::Sha256Mismatch {
            artifact: name(),
            expected: hex::encode(expected_sha256),
            got: hex::encode(got),
        })
    };
    match pumped {
        Err(PumpError::Decode(error, uncompressed_offset)) => {
            // The source's own error (or over-length) surfaces through the decoder.
            let (problem, decode_error) = if state.source_failed.get() {
                (source_error(Some(error)), None)
            } else if state.over_long.get() {
                (source_error(None), None)
            } else {
                (source_error(drained.err()), Some(error))
            };
            if let Some(problem) = problem {
                return Err(problem);
            }
            return Err(InstallError::Decompress {
                artifact: name(),
                uncompressed_offset,
                source: decode_error
                    .unwrap_or_else(|| io::Error::other("the signed bytes do not decode")),
            });
        }
        Err(PumpError::UncompressedTooLong) => {
            if let Some(problem) = source_error(drained.err()) {
                return Err(problem);
            }
            return Err(InstallError::UncompressedLongerThanSigned {
                artifact: name(),
                signed_size: artifact.uncompressed_size,
            });
        }
        Err(PumpError::WriterGone) => unreachable!("the writer reports its own error"),
        Ok(()) => {
            if let Some(problem) = source_error(drained.err()) {
                return Err(problem);
            }
        }
    }
    if written.bytes != artifact.uncompressed_size {
        return Err(InstallError::UncompressedSizeMismatch {
            artifact: name(),
            expected: artifact.uncompressed_size,
            got: written.bytes,
        });
    }
    let (uncompressed_sha256, verity_tree) = match written.digest {
        ContentDigest::Sha256(sha256) => {
            if sha256 != expected_uncompressed_sha256 {
                return Err(InstallError::UncompressedSha256Mismatch {
                    artifact: name(),
                    expected: hex::encode(expected_uncompressed_sha256),
                    got: hex::encode(sha256),
                });
            }
            (Some(hex::encode(sha256)), None)
        }
        ContentDigest::VerityTree(tree) => {
            // The byte count matched the tree's size just above.
            let tree = tree.map_err(|_| InstallError::UncompressedSizeMismatch {
                artifact: name(),
                expected: artifact.uncompressed_size,
                got: written.bytes,
            })?;
            let expected = expected_root_hash.expect("a tree has its signed root hash");
            if *tree.root_hash() != expected {
                return Err(InstallError::UncompressedRootHashMismatch {
                    artifact: name(),
                    expected: root_hash_to_hex(&expected),
                    got: root_hash_to_hex(tree.root_hash()),
                });
            }
            (None, Some(tree))
        }
    };
    disk.sync_data().map_err(|source| InstallError::Sync {
        artifact: name(),
        partition: partition.name.clone(),
        source,
    })?;
    tracing::info!(
        artifact = %artifact.name,
        partition = %partition.name,
        bytes = written.bytes,
        "artifact written and checked"
    );
    Ok(WrittenArtifact {
        name: name(),
        partition: partition.name.clone(),
        compressed_bytes: state.count.get(),
        uncompressed_bytes: written.bytes,
        uncompressed_sha256,
        verity_tree,
        written_crcs: written.crcs.map(|crcs| crcs.finish(partition)),
    })
}

/// Where [`stream`] writes, and what bounds it.
struct Limits<'a> {
    artifact: &'a Artifact,
    partition: &'a PartitionRange,
    disk: &'a File,
}

/// Decodes `decoded` into buffers and hashes them on this thread, and writes
/// them on a second one. Returns how decoding ended and what the writer did.
fn stream<D: Read>(
    decoded: &mut D,
    state: &SourceState,
    limits: &Limits<'_>,
    mut hasher: ContentHasher,
    progress: &mut dyn FnMut(u64),
) -> (Result<(), PumpError>, Result<Written, InstallError>) {
    std::thread::scope(|scope| {
        let (full_sender, full_receiver) = sync_channel::<Chunk>(BUFFER_COUNT);
        let (empty_sender, empty_receiver) = sync_channel::<AlignedBuffer>(BUFFER_COUNT);
        for _ in 0..BUFFER_COUNT {
            empty_sender
                .send(AlignedBuffer::new(BUFFER_SIZE))
                .expect("the channel holds BUFFER_COUNT buffers");
        }
        let writer = scope.spawn(move || write_chunks(full_receiver, empty_sender, limits));
        let pumped = pump(
            decoded,
            state,
            limits.artifact.uncompressed_size,
            &mut hasher,
            full_sender,
            empty_receiver,
            progress,
        );
        let written = writer
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        let written = written.map(|(bytes, crcs)| Written {
            bytes,
            digest: match hasher {
                ContentHasher::Sha256(hasher) => ContentDigest::Sha256(hasher.finalize().into()),
                ContentHasher::VerityTree(tree) => ContentDigest::VerityTree(tree.finish()),
            },
            crcs,
        });
        (pumped, written)
    })
}

/// Fills buffers from `decoded`, hashes them into `hasher` and sends them to
/// the writer until the end of the stream, never sending more than
/// `uncompressed_size` bytes in total.
fn pump<D: Read>(
    decoded: &mut D,
    state: &SourceState,
    uncompressed_size: u64,
    hasher: &mut ContentHasher,
    full: SyncSender<Chunk>,
    empty: Receiver<AlignedBuffer>,
    progress: &mut dyn FnMut(u64),
) -> Result<(), PumpError> {
    let mut total = 0u64;
    loop {
        let Ok(mut buffer) = empty.recv() else {
            return Err(PumpError::WriterGone);
        };
        let len = fill(decoded, &mut buffer)
            .map_err(|(error, filled)| PumpError::Decode(error, total + filled as u64))?;
        if total + len as u64 > uncompressed_size {
            return Err(PumpError::UncompressedTooLong);
        }
        let at_end = len < buffer.len();
        if len > 0 {
            hasher.update(&buffer[..len])?;
            full.send(Chunk {
                buffer,
                len,
                position: total,
            })
            .map_err(|_| PumpError::WriterGone)?;
            total += len as u64;
        }
        progress(state.count.get());
        if at_end {
            return Ok(());
        }
    }
}

/// Reads until `buffer` is full or the stream ends; returns the bytes read,
/// or the error with the bytes read before it.
pub(crate) fn fill<D: Read>(
    decoded: &mut D,
    buffer: &mut [u8],
) -> Result<usize, (io::Error, usize)> {
    let mut filled = 0;
    while filled < buffer.len() {
        match decoded.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(got) => filled += got,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err((error, filled)),
        }
    }
    Ok(filled)
}

/// The writing thread: writes each chunk inside the partition and hands the
/// buffer back; returns the bytes written, and the CRC-32 of each chunk if
/// all went with `O_DIRECT` ([`WrittenCrcs`]). Whole aligned blocks go
/// through an `O_DIRECT` descriptor of the disk where there is one (no copy
/// into the page cache, and they can be read back from the device), the
/// rest (an unaligned tail) through `disk`; [`write_artifact`] syncs both.
fn write_chunks(
    full: Receiver<Chunk>,
    empty: SyncSender<AlignedBuffer>,
    limits: &Limits<'_>,
) -> Result<(u64, Option<PieceCrcs>), InstallError> {
    let partition = limits.partition;
    let mut direct = reopen_direct(limits.disk, true);
    let mut crcs = direct.as_ref().map(|_| PieceCrcs::new());
    let mut bytes = 0u64;
    for chunk in full {
        let data = &chunk.buffer[..chunk.len];
        let write_error = |source| InstallError::Write {
            artifact: limits.artifact.name.clone(),
            partition: partition.name.clone(),
            offset: chunk.position,
            source,
        };
        if chunk.position + data.len() as u64 > partition.size {
            // Unreachable by the checks before; never write outside the partition.
            return Err(write_error(io::Error::other(format!(
                "{} bytes would end past the partition's {} bytes",
                data.len(),
                partition.size
            ))));
        }
        let at = partition.offset + chunk.position;
        let mut done = 0;
        if let Some(file) = &direct {
            let len = direct_len(at, data.len());
            if len > 0 {
                match file.write_all_at(&data[..len], at) {
                    Ok(()) => done = len,
                    // Written again below, through the page cache, and from
                    // now on: a disk that does not take O_DIRECT here.
                    Err(error) if direct_refused(&error) => direct = None,
                    Err(error) => return Err(write_error(error)),
                }
            }
        }
        if done < data.len() {
            limits
                .disk
                .write_all_at(&data[done..], at + done as u64)
                .map_err(write_error)?;
            crcs = None;
        }
        if let Some(crcs) = crcs.as_mut() {
            crcs.update(data);
        }
        bytes += data.len() as u64;
        // The decompressing side may have stopped; then the buffer is dropped.
        let _ = empty.send(chunk.buffer);
    }
    Ok((bytes, crcs))
}

/// CRC-32s of consecutive [`BUFFER_SIZE`] pieces of bytes that arrive in any
/// sizes, from a partition's start: what [`WrittenCrcs`] holds, kept by
/// [`write_artifact`]'s writing thread and by a delta's decoding.
pub(crate) struct PieceCrcs {
    hasher: crc32fast::Hasher,
    filled: usize,
    bytes: u64,
    crcs: Vec<u32>,
}

impl PieceCrcs {
    pub(crate) fn new() -> PieceCrcs {
        PieceCrcs {
            hasher: crc32fast::Hasher::new(),
            filled: 0,
            bytes: 0,
            crcs: Vec::new(),
        }
    }

    pub(crate) fn update(&mut self, mut bytes: &[u8]) {
        self.bytes += bytes.len() as u64;
        while !bytes.is_empty() {
            let take = (BUFFER_SIZE - self.filled).min(bytes.len());
            self.hasher.update(&bytes[..take]);
            self.filled += take;
            bytes = &bytes[take..];
            if self.filled == BUFFER_SIZE {
                let hasher = std::mem::replace(&mut self.hasher, crc32fast::Hasher::new());
                self.crcs.push(hasher.finalize());
                self.filled = 0;
            }
        }
    }

    pub(crate) fn finish(mut self, partition: &PartitionRange) -> WrittenCrcs {
        if self.filled > 0 {
            self.crcs.push(self.hasher.finalize());
        }
        WrittenCrcs {
            partition: partition.clone(),
            bytes: self.bytes,
            crcs: self.crcs,
        }
    }
}

/// Whether [`read_back`] reads `disk` from the device (it takes `O_DIRECT`).
pub(crate) fn reads_back_from_the_device(disk: &File) -> bool {
    reopen_direct(disk, false).is_some()
}

/// Reads what [`write_artifact`] wrote (`written`) back from the disk with
/// `O_DIRECT` (from the device, whatever the page cache holds), a thread
/// ahead of the comparison, and compares each piece with its CRC-32: the
/// check that the disk kept what it was given. On a disk that does not take
/// `O_DIRECT` this is not a read from the device; the caller uses
/// [`verify_slot`] there (and [`write_artifact`] gives no CRCs).
pub fn read_back(disk: &File, slot: Slot, written: &WrittenCrcs) -> Result<(), InstallError> {
    let partition = &written.partition;
    let pieces = written.bytes.div_ceil(BUFFER_SIZE as u64);
    if written.crcs.len() as u64 != pieces || written.bytes > partition.size {
        return Err(InstallError::ReadBack {
            slot,
            partition: partition.name.clone(),
            offset: 0,
            source: io::Error::other(format!(
                "{} CRCs for {} bytes: not what was written",
                written.crcs.len(),
                written.bytes
            )),
        });
    }
    std::thread::scope(|scope| {
        let mut region = ReadAhead::start(scope, disk, partition.offset, written.bytes);
        let mut buffer = vec![0u8; BUFFER_SIZE];
        for (index, expected) in written.crcs.iter().enumerate() {
            let offset = index as u64 * BUFFER_SIZE as u64;
            let len = (written.bytes - offset).min(BUFFER_SIZE as u64) as usize;
            region
                .read_exact(&mut buffer[..len])
                .map_err(|source| InstallError::ReadBack {
                    slot,
                    partition: partition.name.clone(),
                    offset,
                    source,
                })?;
            if crc32fast::hash(&buffer[..len]) != *expected {
                return Err(InstallError::ReadBackMismatch {
                    slot,
                    partition: partition.name.clone(),
                    offset,
                    len,
                });
            }
        }
        Ok(())
    })
}

/// Reads the rest of the source to its end (bounded by the signed length the
/// reader enforces) to judge it, unless writing already failed (then the
/// download is not worth finishing).
fn drain_if_ok<R: Read>(written: &Result<Written, InstallError>, reader: &mut R) -> io::Result<()> {
    if written.is_err() {
        return Ok(());
    }
    let mut scratch = vec![0u8; DRAIN_BUFFER_SIZE];
    loop {
        match reader.read(&mut scratch) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
}

/// A byte range of the disk as a `Read + Seek` of its own (positions relative
/// to its start, `End` at its length), read with `pread`.
struct Region<'a> {
    disk: &'a File,
    offset: u64,
    len: u64,
    position: u64,
}

impl<'a> Region<'a> {
    fn new(disk: &'a File, offset: u64, len: u64) -> Region<'a> {
        Region {
            disk,
            offset,
            len,
            position: 0,
        }
    }
}

impl Read for Region<'_> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let left = self.len.saturating_sub(self.position);
        let len = buffer
            .len()
            .min(usize::try_from(left).unwrap_or(usize::MAX));
        if len == 0 {
            return Ok(0);
        }
        let got = self
            .disk
            .read_at(&mut buffer[..len], self.offset + self.position)?;
        self.position += got as u64;
        Ok(got)
    }
}

impl Seek for Region<'_> {
    fn seek(&mut self, target: SeekFrom) -> io::Result<u64> {
        let position = match target {
            SeekFrom::Start(position) => Some(position),
            SeekFrom::End(delta) => self.len.checked_add_signed(delta),
            SeekFrom::Current(delta) => self.position.checked_add_signed(delta),
        };
        let position = position.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the region",
            )
        })?;
        self.position = position;
        Ok(position)
    }
}

/// Bytes of each read of [`ReadAhead`]'s thread.
const READ_AHEAD_CHUNK_SIZE: usize = 1 << 20;
/// Chunks [`ReadAhead`]'s thread may read before they are used.
const READ_AHEAD_CHUNKS: usize = 4;

/// A [`Region`] read sequentially from its start by a second thread, ahead of
/// its reader, so reading the disk overlaps what the reader does with the
/// bytes (hashing them). The thread reads with `O_DIRECT` where it can, so
/// the bytes come from the device even if some of the range is still in the
/// page cache (and no page cache is filled only to be copied once); reads
/// elsewhere in the region go to the disk directly. Memory:
/// `READ_AHEAD_CHUNKS + 1` buffers of [`READ_AHEAD_CHUNK_SIZE`].
struct ReadAhead<'a> {
    region: Region<'a>,
    /// Chunks in order, from the region's start; closed after the last one.
    chunks: Receiver<io::Result<AlignedBuffer>>,
    /// Used buffers, back to the reading thread.
    used: SyncSender<AlignedBuffer>,
    chunk: Option<AlignedBuffer>,
    /// Bytes of `chunk` already read.
    consumed: usize,
    /// Region position of the chunks' next byte (`chunk[consumed]`).
    stream_position: u64,
}

impl<'a> ReadAhead<'a> {
    /// Starts reading `len` bytes of `disk` at `offset` on a thread of `scope`
    /// (it ends when the region is read or the `ReadAhead` is dropped).
    fn start<'scope>(
        scope: &'scope std::thread::Scope<'scope, '_>,
        disk: &'a File,
        offset: u64,
        len: u64,
    ) -> ReadAhead<'a>
    where
        'a: 'scope,
    {
        let (chunk_sender, chunks) = sync_channel(READ_AHEAD_CHUNKS);
        let (used, used_receiver) = sync_channel::<AlignedBuffer>(READ_AHEAD_CHUNKS + 1);
        for _ in 0..READ_AHEAD_CHUNKS {
            used.send(AlignedBuffer::new(READ_AHEAD_CHUNK_SIZE))
                .expect("the channel holds READ_AHEAD_CHUNKS + 1 buffers");
        }
        scope.spawn(move || {
            let mut direct = reopen_direct(disk, false);
            let mut done = 0u64;
            while done < len {
                let Ok(mut buffer) = used_receiver.recv() else {
                    return;
                };
                let want = (len - done).min(READ_AHEAD_CHUNK_SIZE as u64) as usize;
                buffer.truncate_or_restore(want);
                let at = offset + done;
                let mut read = None;
                if let Some(file) = direct.as_ref().filter(|_| direct_len(at, want) == want) {
                    match file.read_exact_at(&mut buffer, at) {
                        Err(error) if direct_refused(&error) => direct = None,
                        other => read = Some(other),
                    }
                }
                let read = read.unwrap_or_else(|| disk.read_exact_at(&mut buffer, at));
                let failed = read.is_err();
                if chunk_sender.send(read.map(|()| buffer)).is_err() || failed {
                    return;
                }
                done += want as u64;
            }
        });
        ReadAhead {
            region: Region::new(disk, offset, len),
            chunks,
            used,
            chunk: None,
            consumed: 0,
            stream_position: 0,
        }
    }
}

impl Read for ReadAhead<'_> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let position = self.region.position;
        if position != self.stream_position || position >= self.region.len || buffer.is_empty() {
            return self.region.read(buffer);
        }
        let left = self
            .chunk
            .as_ref()
            .map_or(0, |chunk| chunk.len() - self.consumed);
        if left == 0 {
            let next = match self.chunks.recv() {
                Ok(next) => next?,
                // Unreachable before the region's end; read it directly then.
                Err(_) => return self.region.read(buffer),
            };
            if let Some(used) = self.chunk.replace(next) {
                let _ = self.used.try_send(used);
            }
            self.consumed = 0;
        }
        let chunk = self.chunk.as_ref().expect("a chunk was just received");
        let len = buffer.len().min(chunk.len() - self.consumed);
        buffer[..len].copy_from_slice(&chunk[self.consumed..self.consumed + len]);
        self.consumed += len;
        self.stream_position += len as u64;
        self.region.position += len as u64;
        Ok(len)
    }
}

impl Seek for ReadAhead<'_> {
    fn seek(&mut self, target: SeekFrom) -> io::Result<u64> {
        self.region.seek(target)
    }
}

/// Asks the kernel to drop cached pages of a byte range of the disk, so the
/// next read comes from the device rather than from what was just written.
/// Best effort: clean pages only (call after a sync), ignored where unsupported.
fn drop_cached(disk: &File, offset: u64, len: u64) {
    let Some(len) = std::num::NonZeroU64::new(len) else {
        return;
    };
    let _ = rustix::fs::fadvise(disk, offset, Some(len), rustix::fs::Advice::DontNeed);
}

/// The manifest's verity parameters, checked: (root hash, salt, data bytes).
fn parse_verity_info(
    slot: Slot,
    verity: &VerityInfo,
) -> Result<(RootHash, Vec<u8>, u64), InstallError> {
    verity_parameters(verity).map_err(|reason| InstallError::InvalidVerityInfo { slot, reason })
}

/// [`parse_verity_info`] without a slot to name: the reason as text.
fn verity_parameters(verity: &VerityInfo) -> Result<(RootHash, Vec<u8>, u64), String> {
    let root_hash =
        verity::root_hash_from_hex(&verity.root_hash).map_err(|error| error.to_string())?;
    let salt =
        hex::decode(&verity.salt).map_err(|_| format!("salt {:?} is not hex", verity.salt))?;
    if verity.hash_algorithm != ALGORITHM {
        return Err(format!(
            "expected hash algorithm {ALGORITHM:?}, found {:?}",
            verity.hash_algorithm
        ));
    }
    for (what, size) in [
        ("data block size", verity.data_block_size),
        ("hash block size", verity.hash_block_size),
    ] {
        if u64::from(size) != VERITY_BLOCK_SIZE {
            return Err(format!("expected {what} {VERITY_BLOCK_SIZE}, found {size}"));
        }
    }
    let data_bytes = verity
        .data_blocks
        .checked_mul(VERITY_BLOCK_SIZE)
        .filter(|bytes| *bytes > 0)
        .ok_or_else(|| format!("unusable data block count {}", verity.data_blocks))?;
    Ok((root_hash, salt, data_bytes))
}

/// The slot's partitions hold `data_bytes` of root and its hash tree;
/// returns the hash tree's size.
fn check_slot_sizes(partitions: &SlotPartitions, data_bytes: u64) -> Result<u64, InstallError> {
    let hash_bytes = verity::hash_device_size(data_bytes);
    for (partition, needed, what) in [
        (&partitions.root, data_bytes, "the root file system"),
        (&partitions.verity, hash_bytes, "the verity hash tree"),
    ] {
        if partition.size < needed {
            return Err(InstallError::SlotTooSmall {
                slot: partitions.slot,
                partition: partition.name.clone(),
                size: partition.size,
                needed,
                what,
            });
        }
    }
    Ok(hash_bytes)
}

/// Re-reads a written slot from the disk and checks it: the verity superblock
/// on `verity-<slot>` must be the manifest's (block count, salt), the hash tree
/// must lead to `verity.root_hash`, and the root partition's first
/// `data_blocks` blocks must match the tree.
///
/// Cached pages of both ranges are dropped first (the data was synced by
/// [`write_artifact`]), so on a block device the bytes come from the device;
/// the root's data is read with `O_DIRECT` where possible (bypassing the
/// page cache, whatever it holds), by a second thread ahead of the hashing.
/// A root that does not match fails with [`InstallError::RootHashMismatch`]
/// naming the slot, the expected root hash and the one the data hashes to.
pub fn verify_slot(
    disk: &File,
    partitions: &SlotPartitions,
    verity: &VerityInfo,
) -> Result<(), InstallError> {
    let slot = partitions.slot;
    let (expected, salt, data_bytes) = parse_verity_info(slot, verity)?;
    let hash_bytes = check_slot_sizes(partitions, data_bytes)?;
    drop_cached(disk, partitions.root.offset, data_bytes);
    drop_cached(disk, partitions.verity.offset, hash_bytes);

    let mut superblock_bytes = [0u8; SUPERBLOCK_SIZE];
    disk.read_exact_at(&mut superblock_bytes, partitions.verity.offset)
        .map_err(|source| InstallError::VerifyRead {
            slot,
            source: VerityError::Io {
                context: format!(
                    "reading the verity superblock of {}",
                    partitions.verity.name
                ),
                source,
            },
        })?;
    let mismatch = |reason: String| InstallError::SuperblockMismatch {
        slot,
        partition: partitions.verity.name.clone(),
        reason,
    };
    let superblock =
        VeritySuperblock::parse(&superblock_bytes).map_err(|error| mismatch(error.to_string()))?;
    if superblock.data_blocks != verity.data_blocks {
        return Err(mismatch(format!(
            "expected {} data blocks, found {}",
            verity.data_blocks, superblock.data_blocks
        )));
    }
    if superblock.salt != salt {
        return Err(mismatch(format!(
            "expected salt {}, found {}",
            verity.salt,
            hex::encode(&superblock.salt)
        )));
    }

    let hash_device = Region::new(disk, partitions.verity.offset, hash_bytes);
    let verified = std::thread::scope(|scope| {
        let root = ReadAhead::start(scope, disk, partitions.root.offset, data_bytes);
        verity::verify(root, hash_device, &expected)
    });
    let failure = match verified {
        Ok(_) => {
            tracing::info!(%slot, root_hash = %verity.root_hash, "slot verified");
            return Ok(());
        }
        Err(source @ (VerityError::Io { .. } | VerityError::ShortRead { .. })) => {
            return Err(InstallError::VerifyRead { slot, source })
        }
        Err(failure) => failure,
    };
    // Tell a wrong root from a wrong hash tree: hash the root data alone.
    let found = std::thread::scope(|scope| {
        let root = ReadAhead::start(scope, disk, partitions.root.offset, data_bytes);
        verity::compute_root_hash(root, data_bytes, &salt)
    })
    .map_err(|source| InstallError::VerifyRead { slot, source })?;
    if found != expected {
        return Err(InstallError::RootHashMismatch {
            slot,
            partition: partitions.root.name.clone(),
            expected,
            found,
            detail: failure.to_string(),
        });
    }
    Err(InstallError::HashTreeCorrupt {
        slot,
        partition: partitions.verity.name.clone(),
        source: failure,
    })
}

/// What [`check_streamed_slot`] needs of a slot written by
/// [`write_root_artifact`] and [`write_artifact`] with `O_DIRECT`: the
/// root's tree, computed as it streamed, and both partitions' CRCs.
#[derive(Clone, Debug)]
pub struct StreamedSlot {
    pub tree: StreamedTree,
    pub root: WrittenCrcs,
    pub verity: WrittenCrcs,
}

impl StreamedSlot {
    /// The root's and the hash tree's [`WrittenArtifact`]s, if they allow
    /// [`check_streamed_slot`] (the root checked by its tree, both written
    /// with `O_DIRECT`).
    pub fn from_written(root: &WrittenArtifact, verity: &WrittenArtifact) -> Option<StreamedSlot> {
        Some(StreamedSlot {
            tree: root.verity_tree.clone()?,
            root: root.written_crcs.clone()?,
            verity: verity.written_crcs.clone()?,
        })
    }
}

/// Checks a slot whose root was written by [`write_root_artifact`] (its
/// bytes checked against the signed root hash as they streamed) and whose
/// hash tree was written by [`write_artifact`], both with `O_DIRECT`
/// ([`StreamedSlot`]): both partitions are read back from the device and
/// compared with what was written ([`read_back`]), then the hash tree on
/// `verity-<slot>` must be the one of the streamed root (superblock block
/// count and salt, every hash block; only its lowest level is hashed).
/// [`verify_slot`] checks the same by hashing the whole root again.
pub fn check_streamed_slot(
    disk: &File,
    partitions: &SlotPartitions,
    verity: &VerityInfo,
    streamed: &StreamedSlot,
) -> Result<(), InstallError> {
    let slot = partitions.slot;
    let tree = &streamed.tree;
    let (expected, _, data_bytes) = parse_verity_info(slot, verity)?;
    for (written, partition) in [
        (&streamed.root, &partitions.root),
        (&streamed.verity, &partitions.verity),
    ] {
        let (at, range) = (&written.partition, partition);
        if (&at.name, at.offset, at.size) != (&range.name, range.offset, range.size) {
            // Not reachable: the CRCs are of what was written to this slot.
            return Err(InstallError::ReadBack {
                slot,
                partition: partition.name.clone(),
                offset: 0,
                source: io::Error::other(format!(
                    "the CRCs are of {}, not of this partition",
                    written.partition.name
                )),
            });
        }
        read_back(disk, slot, written)?;
    }
    if tree.root_hash() != &expected {
        // Not reachable after write_root_artifact with the same `verity`.
        return Err(InstallError::RootHashMismatch {
            slot,
            partition: partitions.root.name.clone(),
            expected,
            found: *tree.root_hash(),
            detail: "computed while the root was written".to_string(),
        });
    }
    let hash_bytes = check_slot_sizes(partitions, data_bytes)?;
    drop_cached(disk, partitions.verity.offset, hash_bytes);
    let hash_device = Region::new(disk, partitions.verity.offset, hash_bytes);
    match tree.check_hash_device(hash_device) {
        Ok(_) => {
            tracing::info!(%slot, root_hash = %verity.root_hash, "slot verified (read back from the disk; the root's hash tree computed as it was written)");
            Ok(())
        }
        Err(VerityError::BadSuperblock { reason }) => Err(InstallError::SuperblockMismatch {
            slot,
            partition: partitions.verity.name.clone(),
            reason,
        }),
        Err(source @ (VerityError::Io { .. } | VerityError::ShortRead { .. })) => {
            Err(InstallError::VerifyRead { slot, source })
        }
        Err(source) => Err(InstallError::HashTreeCorrupt {
            slot,
            partition: partitions.verity.name.clone(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use os_format::manifest::ArtifactKind;
    use tempfile::NamedTempFile;

    use super::*;
    use crate::slots::test_disk::*;
    use crate::slots::{set_slot_partition_uuids, SlotPartitions};

    const ROOT_LEN: usize = 2 * MIB as usize;

    /// A disk with slot A installed, and a new root (compressed) for slot B.
    struct Fixture {
        disk: NamedTempFile,
        slot_a: Root,
        new: Root,
        root_zst: Vec<u8>,
        verity_zst: Vec<u8>,
        root_artifact: Artifact,
        verity_artifact: Artifact,
    }

    impl Fixture {
        fn new() -> Fixture {
            let slot_a = Root::new(ROOT_LEN, 1);
            let new = Root::new(ROOT_LEN, 2);
            let disk = disk_image(&slot_a);
            let root_zst = zstd_compress(&new.data);
            let verity_zst = zstd_compress(&new.hash_device);
            let root_artifact = artifact(
                "root.erofs.zst",
                ArtifactKind::RootFilesystem,
                &root_zst,
                &new.data,
            );
            let verity_artifact = artifact(
                "verity.img.zst",
                ArtifactKind::VerityHashTree,
                &verity_zst,
                &new.hash_device,
            );
            Fixture {
                disk,
                slot_a,
                new,
                root_zst,
                verity_zst,
                root_artifact,
                verity_artifact,
            }
        }

        fn slot(&self, slot: Slot) -> SlotPartitions {
            SlotPartitions::locate(self.disk.path(), slot).unwrap()
        }

        fn open(&self) -> File {
            open_disk_for_writing(self.disk.path()).unwrap()
        }

        /// Writes `source` as the root artifact `artifact` into slot B's root.
        fn write_root(
            &self,
            source: &[u8],
            artifact: &Artifact,
        ) -> Result<WrittenArtifact, InstallError> {
            let slot_b = self.slot(Slot::B);
            write_artifact(source, artifact, &self.open(), &slot_b.root, &mut |_| {})
        }

        fn disk_bytes(&self) -> Vec<u8> {
            std::fs::read(self.disk.path()).unwrap()
        }
    }

    /// The disk's bytes outside `range`.
    fn outside(bytes: &[u8], range: &PartitionRange) -> Vec<u8> {
        let mut rest = bytes[..range.offset as usize].to_vec();
        rest.extend_from_slice(&bytes[range.end() as usize..]);
        rest
    }

    #[test]
    fn happy_path_writes_and_verifies_slot_b_without_touching_slot_a() {
        let fixture = Fixture::new();
        let slot_a = fixture.slot(Slot::A);
        let slot_b = fixture.slot(Slot::B);
        let disk = fixture.open();
        let a_before = (
            sha256_of_range(&disk, slot_a.root.offset, slot_a.root.size),
            sha256_of_range(&disk, slot_a.verity.offset, slot_a.verity.size),
        );
        let before = fixture.disk_bytes();

        let mut progress = Vec::new();
        let root = write_artifact(
            &fixture.root_zst[..],
            &fixture.root_artifact,
            &disk,
            partition_for(&fixture.root_artifact, &slot_b).unwrap(),
            &mut |bytes| progress.push(bytes),
        )
        .unwrap();
        assert_eq!(
            root,
            WrittenArtifact {
                name: "root.erofs.zst".into(),
                partition: "root-b".into(),
                compressed_bytes: fixture.root_zst.len() as u64,
                uncompressed_bytes: ROOT_LEN as u64,
                uncompressed_sha256: Some(fixture.root_artifact.uncompressed_sha256.clone()),
                verity_tree: None,
                written_crcs: root.written_crcs.clone(),
            }
        );
        assert_eq!(
            root.written_crcs.is_some(),
            reopen_direct(&disk, true).is_some()
        );
        assert!(
            progress.windows(2).all(|pair| pair[0] <= pair[1]),
            "{progress:?}"
        );
        assert_eq!(progress.last(), Some(&(fixture.root_zst.len() as u64)));
        let verity = write_artifact(
            &fixture.verity_zst[..],
            &fixture.verity_artifact,
            &disk,
            partition_for(&fixture.verity_artifact, &slot_b).unwrap(),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(verity.partition, "verity-b");

        verify_slot(&disk, &slot_b, &fixture.new.verity_info()).unwrap();
        let after = fixture.disk_bytes();
        assert_eq!(
            &after[slot_b.root.offset as usize..][..ROOT_LEN],
            &fixture.new.data[..]
        );
        // Nothing outside the two written ranges changed; slot A is identical.
        let mut untouched_before = outside(&before, &slot_b.verity);
        let mut untouched_after = outside(&after, &slot_b.verity);
        let root_range = PartitionRange {
            size: ROOT_LEN as u64,
            ..slot_b.root.clone()
        };
        untouched_before = outside(&untouched_before, &root_range);
        untouched_after = outside(&untouched_after, &root_range);
        assert!(
            untouched_before == untouched_after,
            "bytes outside the written ranges changed"
        );
        assert_eq!(
            (
                sha256_of_range(&disk, slot_a.root.offset, slot_a.root.size),
                sha256_of_range(&disk, slot_a.verity.offset, slot_a.verity.size),
            ),
            a_before
        );
        verify_slot(&disk, &slot_a, &fixture.slot_a.verity_info()).unwrap();

        // The slot is complete: give it its PARTUUIDs.
        let b =
            set_slot_partition_uuids(fixture.disk.path(), Slot::B, Some(&fixture.new.root_hash))
                .unwrap();
        assert_eq!(
            b.root.unique_guid,
            os_format::layout::root_partition_uuid(&fixture.new.root_hash)
        );
    }

    #[test]
    fn uncompressed_artifacts_are_written_as_they_are() {
        let fixture = Fixture::new();
        let slot_b = fixture.slot(Slot::B);
        let disk = fixture.open();
        let plain = artifact(
            "verity.img",
            ArtifactKind::VerityHashTree,
            &fixture.new.hash_device,
            &fixture.new.hash_device,
        );
        assert_eq!(plain.compression, Compression::None);
        write_artifact(
            &fixture.new.hash_device[..],
            &plain,
            &disk,
            &slot_b.verity,
            &mut |_| {},
        )
        .unwrap();
        write_artifact(
            &fixture.root_zst[..],
            &fixture.root_artifact,
            &disk,
            &slot_b.root,
            &mut |_| {},
        )
        .unwrap();
        verify_slot(&disk, &slot_b, &fixture.new.verity_info()).unwrap();

        let mut longer = fixture.new.hash_device.clone();
        longer.push(0);
        let error =
            write_artifact(&longer[..], &plain, &disk, &slot_b.verity, &mut |_| {}).unwrap_err();
        assert!(
            matches!(error, InstallError::LongerThanSigned { .. }),
            "{error}"
        );
        let error = write_artifact(
            &fixture.new.hash_device[1..],
            &plain,
            &disk,
            &slot_b.verity,
            &mut |_| {},
        )
        .unwrap_err();
        assert!(matches!(error, InstallError::Truncated { .. }), "{error}");
    }

    #[test]
    fn a_large_artifact_streams_through_several_buffers() {
        // 2 buffers and a bit into a 12 MiB range in the middle of a 16 MiB file.
        let data = pseudo_random(2 * BUFFER_SIZE + 12_345, 5);
        let compressed = zstd_compress(&data);
        let entry = artifact("big.zst", ArtifactKind::RootFilesystem, &compressed, &data);
        let file = NamedTempFile::new().unwrap();
        let background = pseudo_random(MIB as usize, 6).repeat(16);
        std::fs::write(file.path(), &background).unwrap();
        let partition = PartitionRange {
            name: "big".into(),
            number: 1,
            offset: 2 * MIB,
            size: 12 * MIB,
            unique_guid: os_format::gpt::Guid::derive(b"big"),
        };
        let disk = open_disk_for_writing(file.path()).unwrap();
        let mut calls = 0;
        let written = write_artifact(&compressed[..], &entry, &disk, &partition, &mut |_| {
            calls += 1
        })
        .unwrap();
        assert_eq!(written.uncompressed_bytes, data.len() as u64);
        assert!(calls >= 3, "progress reported per buffer: {calls}");
        let after = std::fs::read(file.path()).unwrap();
        assert_eq!(
            after.len(),
            background.len(),
            "the file did not grow or shrink"
        );
        let start = partition.offset as usize;
        assert!(after[start..start + data.len()] == data[..]);
        assert!(after[..start] == background[..start]);
        assert!(after[start + data.len()..] == background[start + data.len()..]);
    }

    #[test]
    fn truncated_sources_are_refused() {
        let fixture = Fixture::new();
        let full = fixture.root_zst.len();
        for cut in [full - 1, full / 2, 0] {
            let error = fixture
                .write_root(&fixture.root_zst[..cut], &fixture.root_artifact)
                .unwrap_err();
            match &error {
                InstallError::Truncated {
                    artifact,
                    expected,
                    got,
                } => {
                    assert_eq!(artifact, "root.erofs.zst");
                    assert_eq!((*expected, *got), (full as u64, cut as u64));
                }
                other => panic!("expected Truncated, found {other}"),
            }
            assert!(
                error.to_string().starts_with("root.erofs.zst: truncated"),
                "{error}"
            );
        }
    }

    /// A source that serves `bytes`, then zeros forever, counting what it served.
    struct Endless<'a> {
        bytes: &'a [u8],
        served: u64,
    }

    impl Read for Endless<'_> {
        fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
            let start = (self.served as usize).min(self.bytes.len());
            let from_bytes = (self.bytes.len() - start).min(buffer.len());
            buffer[..from_bytes].copy_from_slice(&self.bytes[start..start + from_bytes]);
            let len = if from_bytes > 0 {
                from_bytes
            } else {
                buffer.len()
            };
            buffer[from_bytes..len].fill(0);
            self.served += len as u64;
            Ok(len)
        }
    }

    #[test]
    fn over_long_sources_fail_as_soon_as_the_signed_length_is_passed() {
        let fixture = Fixture::new();
        let mut longer = fixture.root_zst.clone();
        longer.extend_from_slice(b"extra");
        let error = fixture
            .write_root(&longer, &fixture.root_artifact)
            .unwrap_err();
        assert!(
            matches!(&error, InstallError::LongerThanSigned { signed_size, .. } if *signed_size == fixture.root_zst.len() as u64),
            "{error}"
        );
        assert_eq!(
            error.to_string(),
            format!(
                "root.erofs.zst: is longer than its signed length {}",
                fixture.root_zst.len()
            )
        );

        // An endless source: reading stops one byte past the signed length.
        let slot_b = fixture.slot(Slot::B);
        let mut endless = Endless {
            bytes: &fixture.root_zst,
            served: 0,
        };
        let error = write_artifact(
            &mut endless,
            &fixture.root_artifact,
            &fixture.open(),
            &slot_b.root,
            &mut |_| {},
        )
        .unwrap_err();
        assert!(
            matches!(error, InstallError::LongerThanSigned { .. }),
            "{error}"
        );
        assert_eq!(endless.served, fixture.root_zst.len() as u64 + 1);

        // Uncompressed: the signed length is the stored length.
        let plain = artifact(
            "root.erofs",
            ArtifactKind::RootFilesystem,
            &fixture.new.data,
            &fixture.new.data,
        );
        let mut endless = Endless {
            bytes: &fixture.new.data,
            served: 0,
        };
        let error = write_artifact(
            &mut endless,
            &plain,
            &fixture.open(),
            &slot_b.root,
            &mut |_| {},
        )
        .unwrap_err();
        assert!(
            matches!(error, InstallError::LongerThanSigned { .. }),
            "{error}"
        );
        assert_eq!(endless.served, fixture.new.data.len() as u64 + 1);
    }

    #[test]
    fn tampered_bytes_fail_the_sha256_check() {
        let fixture = Fixture::new();
        let len = fixture.root_zst.len();
        // A byte in the middle (zstd may or may not notice), the frame checksum,
        // and the first byte (the magic number).
        for position in [len / 2, len - 2, 0] {
            let mut tampered = fixture.root_zst.clone();
            tampered[position] ^= 0x01;
            let error = fixture
                .write_root(&tampered, &fixture.root_artifact)
                .unwrap_err();
            match &error {
                InstallError::Sha256Mismatch { expected, got, .. } => {
                    assert_eq!(*expected, fixture.root_artifact.sha256);
                    assert_eq!(*got, sha256_hex(&tampered));
                }
                other => panic!("byte {position}: expected Sha256Mismatch, found {other}"),
            }
            let message = error.to_string();
            assert!(
                message.starts_with(&format!(
                    "root.erofs.zst: sha256 mismatch: expected {}, got ",
                    fixture.root_artifact.sha256
                )),
                "{message}"
            );
        }
    }

    #[test]
    fn uncompressed_size_must_fit_the_partition_and_match() {
        let fixture = Fixture::new();
        let slot_b = fixture.slot(Slot::B);

        // Bigger than the partition: refused before anything is read or written.
        let big = pseudo_random(ROOT_PARTITION_SIZE as usize + 4096, 9);
        let big_zst = zstd_compress(&big);
        let big_artifact = artifact(
            "root.erofs.zst",
            ArtifactKind::RootFilesystem,
            &big_zst,
            &big,
        );
        let error = fixture.write_root(&big_zst, &big_artifact).unwrap_err();
        match &error {
            InstallError::TooLargeForPartition {
                partition,
                uncompressed_size,
                partition_size,
                ..
            } => {
                assert_eq!(partition, "root-b");
                assert_eq!(*uncompressed_size, big.len() as u64);
                assert_eq!(*partition_size, slot_b.root.size);
            }
            other => panic!("expected TooLargeForPartition, found {other}"),
        }
        assert!(
            error.to_string().contains("does not fit partition root-b"),
            "{error}"
        );

        // A manifest that understates the uncompressed size: nothing past it is written.
        let mut understated = fixture.root_artifact.clone();
        understated.uncompressed_size -= 1;
        let error = fixture
            .write_root(&fixture.root_zst, &understated)
            .unwrap_err();
        assert!(
            matches!(error, InstallError::UncompressedLongerThanSigned { .. }),
            "{error}"
        );
        // ... overstates it.
        let mut overstated = fixture.root_artifact.clone();
        overstated.uncompressed_size += 1;
        let error = fixture
            .write_root(&fixture.root_zst, &overstated)
            .unwrap_err();
        assert!(
            matches!(error, InstallError::UncompressedSizeMismatch { expected, got, .. }
                if expected == ROOT_LEN as u64 + 1 && got == ROOT_LEN as u64),
            "{error}"
        );
        // ... or has the wrong uncompressed sha256.
        let mut wrong = fixture.root_artifact.clone();
        wrong.uncompressed_sha256 = "00".repeat(32);
        let error = fixture.write_root(&fixture.root_zst, &wrong).unwrap_err();
        assert!(
            error.to_string().starts_with(&format!(
                "root.erofs.zst: uncompressed sha256 mismatch: expected {}, got {}",
                "00".repeat(32),
                fixture.root_artifact.uncompressed_sha256
            )),
            "{error}"
        );
    }

    #[test]
    fn understated_uncompressed_size_writes_nothing_past_it() {
        let fixture = Fixture::new();
        let slot_b = fixture.slot(Slot::B);
        let before = fixture.disk_bytes();
        let mut understated = fixture.root_artifact.clone();
        understated.uncompressed_size = 4096;
        fixture
            .write_root(&fixture.root_zst, &understated)
            .unwrap_err();
        let after = fixture.disk_bytes();
        let limit = (slot_b.root.offset + 4096) as usize;
        assert!(after[limit..] == before[limit..]);
    }

    #[test]
    fn bad_digests_and_undecodable_signed_bytes_are_named() {
        let fixture = Fixture::new();
        let mut bad = fixture.root_artifact.clone();
        bad.sha256 = "xyz".into();
        let error = fixture.write_root(&fixture.root_zst, &bad).unwrap_err();
        assert!(
            matches!(
                &error,
                InstallError::InvalidDigest {
                    field: "sha256",
                    ..
                }
            ),
            "{error}"
        );

        // Signed bytes that are not zstd at all.
        let raw = &fixture.new.data[..8192];
        let mut not_zstd = artifact("root.erofs.zst", ArtifactKind::RootFilesystem, raw, raw);
        not_zstd.compression = Compression::Zstd;
        let error = fixture.write_root(raw, &not_zstd).unwrap_err();
        assert!(matches!(error, InstallError::Decompress { .. }), "{error}");
        assert!(
            error.to_string().starts_with("root.erofs.zst: zstd"),
            "{error}"
        );

        let error = partition_for(
            &artifact(
                "uki-b.efi",
                ArtifactKind::KernelImage { slot: Slot::B },
                b"x",
                b"x",
            ),
            &fixture.slot(Slot::B),
        )
        .unwrap_err();
        assert!(
            matches!(error, InstallError::NotAPartitionArtifact { .. }),
            "{error}"
        );
    }

    /// A source that fails after `good` bytes.
    struct Failing<'a> {
        good: Cursor<&'a [u8]>,
    }

    impl Read for Failing<'_> {
        fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
            match self.good.read(buffer)? {
                0 => Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "peer went away",
                )),
                got => Ok(got),
            }
        }
    }

    #[test]
    fn source_errors_are_reported_as_such() {
        let fixture = Fixture::new();
        let slot_b = fixture.slot(Slot::B);
        let cut = fixture.root_zst.len() / 2;
        let error = write_artifact(
            Failing {
                good: Cursor::new(&fixture.root_zst[..cut]),
            },
            &fixture.root_artifact,
            &fixture.open(),
            &slot_b.root,
            &mut |_| {},
        )
        .unwrap_err();
        match &error {
            InstallError::Read { offset, source, .. } => {
                assert_eq!(*offset, cut as u64);
                assert_eq!(source.kind(), io::ErrorKind::ConnectionReset);
            }
            other => panic!("expected Read, found {other}"),
        }
    }

    fn installed_slot_b(fixture: &Fixture) -> (File, SlotPartitions) {
        let slot_b = fixture.slot(Slot::B);
        let disk = fixture.open();
        write_artifact(
            &fixture.root_zst[..],
            &fixture.root_artifact,
            &disk,
            &slot_b.root,
            &mut |_| {},
        )
        .unwrap();
        write_artifact(
            &fixture.verity_zst[..],
            &fixture.verity_artifact,
            &disk,
            &slot_b.verity,
            &mut |_| {},
        )
        .unwrap();
        (disk, slot_b)
    }

    #[test]
    fn a_flipped_byte_in_the_written_root_fails_verification() {
        let fixture = Fixture::new();
        let (disk, slot_b) = installed_slot_b(&fixture);
        let position = slot_b.root.offset + ROOT_LEN as u64 / 2 + 17;
        let mut byte = [0u8];
        disk.read_exact_at(&mut byte, position).unwrap();
        disk.write_all_at(&[byte[0] ^ 0x80], position).unwrap();

        let error = verify_slot(&disk, &slot_b, &fixture.new.verity_info()).unwrap_err();
        let expected_hex = root_hash_to_hex(&fixture.new.root_hash);
        match &error {
            InstallError::RootHashMismatch {
                slot,
                partition,
                expected,
                found,
                ..
            } => {
                assert_eq!(*slot, Slot::B);
                assert_eq!(partition, "root-b");
                assert_eq!(*expected, fixture.new.root_hash);
                assert_ne!(*found, fixture.new.root_hash);
            }
            other => panic!("expected RootHashMismatch, found {other}"),
        }
        let message = error.to_string();
        assert!(message.starts_with("slot b: partition root-b"), "{message}");
        assert!(
            message.contains(&format!("expected {expected_hex}, got ")),
            "{message}"
        );

        // Bytes past the data blocks are not part of the slot.
        disk.write_all_at(&[byte[0]], position).unwrap();
        disk.write_all_at(b"junk", slot_b.root.offset + ROOT_LEN as u64)
            .unwrap();
        verify_slot(&disk, &slot_b, &fixture.new.verity_info()).unwrap();
    }

    #[test]
    fn a_damaged_hash_tree_or_superblock_fails_verification() {
        let fixture = Fixture::new();
        let (disk, slot_b) = installed_slot_b(&fixture);
        let info = fixture.new.verity_info();

        // A byte in the hash tree (past the superblock block).
        let tree_byte = slot_b.verity.offset + 4096 + 100;
        let mut byte = [0u8];
        disk.read_exact_at(&mut byte, tree_byte).unwrap();
        disk.write_all_at(&[byte[0] ^ 1], tree_byte).unwrap();
        let error = verify_slot(&disk, &slot_b, &info).unwrap_err();
        assert!(
            matches!(&error, InstallError::HashTreeCorrupt { partition, .. } if partition == "verity-b"),
            "{error}"
        );
        disk.write_all_at(&byte, tree_byte).unwrap();
        verify_slot(&disk, &slot_b, &info).unwrap();

        // The manifest's salt differs from the superblock's.
        let mut other_salt = info.clone();
        other_salt.salt = "00".repeat(32);
        let error = verify_slot(&disk, &slot_b, &other_salt).unwrap_err();
        assert!(
            matches!(error, InstallError::SuperblockMismatch { .. }),
            "{error}"
        );
        assert!(error.to_string().contains("salt"), "{error}");

        // The other slot's root hash.
        let mut other_hash = info.clone();
        other_hash.root_hash = root_hash_to_hex(&fixture.slot_a.root_hash);
        let error = verify_slot(&disk, &slot_b, &other_hash).unwrap_err();
        assert!(
            matches!(error, InstallError::RootHashMismatch { .. }),
            "{error}"
        );

        // A slot too small for the manifest's block count.
        let mut too_many = info.clone();
        too_many.data_blocks = ROOT_PARTITION_SIZE / 4096 + 1;
        let error = verify_slot(&disk, &slot_b, &too_many).unwrap_err();
        assert!(
            matches!(&error, InstallError::SlotTooSmall { partition, .. } if partition == "root-b"),
            "{error}"
        );
        let mut bad = info;
        bad.root_hash = "nope".into();
        let error = verify_slot(&disk, &slot_b, &bad).unwrap_err();
        assert!(
            matches!(error, InstallError::InvalidVerityInfo { .. }),
            "{error}"
        );
    }

    #[test]
    fn a_stored_artifact_is_hashed_once_and_a_bad_byte_is_a_sha256_mismatch() {
        let fixture = Fixture::new();
        let slot_b = fixture.slot(Slot::B);
        // An odd length: the unaligned tail goes through the page cache, the
        // rest through O_DIRECT (where the file system takes it).
        let data = &fixture.new.data[..ROOT_LEN - 4096 + 123];
        let stored = artifact("root.erofs", ArtifactKind::RootFilesystem, data, data);
        assert_eq!(stored.compression, Compression::None);
        let written = fixture.write_root(data, &stored).unwrap();
        assert_eq!(written.uncompressed_sha256, Some(stored.sha256.clone()));
        assert_eq!(written.compressed_bytes, data.len() as u64);
        let disk = fixture.disk_bytes();
        let start = slot_b.root.offset as usize;
        assert!(disk[start..start + data.len()] == *data);

        let mut tampered = data.to_vec();
        tampered[5000] ^= 0x20;
        let error = fixture.write_root(&tampered, &stored).unwrap_err();
        match &error {
            InstallError::Sha256Mismatch { expected, got, .. } => {
                assert_eq!(*expected, stored.sha256);
                assert_eq!(*got, sha256_hex(&tampered));
            }
            other => panic!("expected Sha256Mismatch, found {other}"),
        }

        // Entries that disagree (shipped vs uncompressed) are both checked.
        let mut disagreeing = stored.clone();
        disagreeing.uncompressed_sha256 = "11".repeat(32);
        let error = fixture.write_root(data, &disagreeing).unwrap_err();
        assert!(
            matches!(error, InstallError::UncompressedSha256Mismatch { .. }),
            "{error}"
        );
    }

    #[test]
    fn writes_at_an_unaligned_partition_offset_land_where_they_belong() {
        let fixture = Fixture::new();
        let slot_b = fixture.slot(Slot::B);
        let before = fixture.disk_bytes();
        let partition = PartitionRange {
            offset: slot_b.root.offset + 512,
            size: slot_b.root.size - 512,
            ..slot_b.root.clone()
        };
        let data = &fixture.new.data[..3 * BUFFER_SIZE / 2];
        let stored = artifact("root.erofs", ArtifactKind::RootFilesystem, data, data);
        write_artifact(data, &stored, &fixture.open(), &partition, &mut |_| {}).unwrap();
        let after = fixture.disk_bytes();
        let start = partition.offset as usize;
        assert!(after[start..start + data.len()] == *data);
        assert!(after[..start] == before[..start]);
        assert!(after[start + data.len()..] == before[start + data.len()..]);
    }

    #[test]
    fn aligned_buffers_and_direct_lengths() {
        for len in [0, 1, 4096, BUFFER_SIZE] {
            let mut buffer = AlignedBuffer::new(len);
            assert_eq!(buffer.as_ptr() as usize % DIRECT_ALIGNMENT, 0);
            assert_eq!(buffer.len(), len);
            buffer.fill(7);
            buffer.truncate_or_restore(len / 2);
            assert_eq!(buffer.len(), len / 2);
            buffer.truncate_or_restore(len);
            assert!(buffer.iter().all(|byte| *byte == 7));
        }
        assert_eq!(direct_len(0, 10_000), 8192);
        assert_eq!(direct_len(1 << 20, 4096), 4096);
        assert_eq!(direct_len(512, 10_000), 0);
        assert_eq!(direct_len(4096, 100), 0);
    }

    #[test]
    fn read_ahead_reads_what_the_disk_holds_wherever_it_is_read() {
        let bytes = pseudo_random(3 * READ_AHEAD_CHUNK_SIZE + 8192, 5);
        let mut file = NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut file, &bytes).unwrap();
        let disk = File::open(file.path()).unwrap();
        // Aligned (O_DIRECT where possible) and unaligned (page cache) regions.
        for (offset, len) in [(4096u64, bytes.len() - 4096), (100, bytes.len() - 300)] {
            let expected = &bytes[offset as usize..offset as usize + len];
            std::thread::scope(|scope| {
                let mut reader = ReadAhead::start(scope, &disk, offset, len as u64);
                assert_eq!(reader.seek(SeekFrom::End(0)).unwrap(), len as u64);
                reader.seek(SeekFrom::Start(0)).unwrap();
                let mut got = vec![0u8; 1000];
                reader.read_exact(&mut got).unwrap();
                assert!(got == expected[..1000]);
                // Elsewhere, then back where the read-ahead stream is.
                reader.seek(SeekFrom::Start(len as u64 - 10)).unwrap();
                let mut tail = Vec::new();
                reader.read_to_end(&mut tail).unwrap();
                assert!(tail == expected[len - 10..]);
                reader.seek(SeekFrom::Start(1000)).unwrap();
                let mut rest = Vec::new();
                reader.read_to_end(&mut rest).unwrap();
                assert!(rest == expected[1000..]);
            });
            // Dropped early: its thread stops.
            std::thread::scope(|scope| {
                let mut reader = ReadAhead::start(scope, &disk, offset, len as u64);
                let mut got = [0u8; 10];
                reader.read_exact(&mut got).unwrap();
            });
        }
        // A region past the end of the disk: a read error, not short data.
        std::thread::scope(|scope| {
            let mut reader = ReadAhead::start(scope, &disk, 0, bytes.len() as u64 + 4096);
            let mut sink = Vec::new();
            assert!(reader.read_to_end(&mut sink).is_err());
        });
    }

    /// Writes the fixture's new root with [`write_root_artifact`] (its
    /// verity info as signed) and its hash tree into slot B.
    fn write_slot_b_by_tree(
        fixture: &Fixture,
        disk: &File,
    ) -> (SlotPartitions, WrittenArtifact, WrittenArtifact) {
        let slot_b = fixture.slot(Slot::B);
        let root = write_root_artifact(
            &fixture.root_zst[..],
            &fixture.root_artifact,
            &fixture.new.verity_info(),
            disk,
            &slot_b.root,
            &mut |_| {},
        )
        .unwrap();
        let verity = write_artifact(
            &fixture.verity_zst[..],
            &fixture.verity_artifact,
            disk,
            &slot_b.verity,
            &mut |_| {},
        )
        .unwrap();
        (slot_b, root, verity)
    }

    /// Whether this test machine's temporary files take `O_DIRECT` (the
    /// checks that need it say so and stop where they do not).
    fn direct_io_here(disk: &File) -> bool {
        let direct = reopen_direct(disk, true).is_some();
        if !direct {
            eprintln!("the temporary directory does not take O_DIRECT: read-back not tested");
        }
        direct
    }

    #[test]
    fn a_root_checked_by_its_tree_while_written_is_checked_without_hashing_it_again() {
        let fixture = Fixture::new();
        let disk = fixture.open();
        let (slot_b, root, verity) = write_slot_b_by_tree(&fixture, &disk);
        let tree = root.verity_tree.clone().expect("checked by its tree");
        assert_eq!(root.uncompressed_sha256, None);
        assert_eq!(
            root_hash_to_hex(tree.root_hash()),
            fixture.new.verity_info().root_hash
        );
        // What is on the disk is what veritysetup made: the whole check agrees.
        let info = fixture.new.verity_info();
        verify_slot(&disk, &slot_b, &info).unwrap();
        if !direct_io_here(&disk) {
            assert!(
                root.written_crcs.is_none() && StreamedSlot::from_written(&root, &verity).is_none()
            );
            return;
        }
        let crcs = root.written_crcs.as_ref().unwrap();
        assert_eq!(
            (crcs.bytes, crcs.crcs.len()),
            (ROOT_LEN as u64, ROOT_LEN / BUFFER_SIZE)
        );
        let streamed = StreamedSlot::from_written(&root, &verity).unwrap();
        check_streamed_slot(&disk, &slot_b, &info, &streamed).unwrap();

        // A byte of the root the disk did not keep: named by its piece.
        let at = slot_b.root.offset + BUFFER_SIZE as u64 + 12345;
        let mut byte = [0u8];
        disk.read_exact_at(&mut byte, at).unwrap();
        disk.write_all_at(&[byte[0] ^ 0x10], at).unwrap();
        disk.sync_data().unwrap();
        let error = check_streamed_slot(&disk, &slot_b, &info, &streamed).unwrap_err();
        assert!(
            matches!(&error, InstallError::ReadBackMismatch { partition, offset, .. }
                if partition == "root-b" && *offset == BUFFER_SIZE as u64),
            "{error}"
        );
        disk.write_all_at(&byte, at).unwrap();
        // A hash block damaged on the disk: the read-back names it.
        let hash_block = slot_b.verity.offset + VERITY_BLOCK_SIZE + 100;
        disk.read_exact_at(&mut byte, hash_block).unwrap();
        disk.write_all_at(&[byte[0] ^ 0x40], hash_block).unwrap();
        disk.sync_data().unwrap();
        let error = check_streamed_slot(&disk, &slot_b, &info, &streamed).unwrap_err();
        assert!(
            matches!(&error, InstallError::ReadBackMismatch { partition, .. } if partition == "verity-b"),
            "{error}"
        );
        disk.write_all_at(&byte, hash_block).unwrap();
        check_streamed_slot(&disk, &slot_b, &info, &streamed).unwrap();
    }

    #[test]
    fn a_hash_tree_that_is_not_the_streamed_root_s_is_refused() {
        let fixture = Fixture::new();
        let disk = fixture.open();
        let (slot_b, root, verity) = write_slot_b_by_tree(&fixture, &disk);
        if !direct_io_here(&disk) {
            return;
        }
        let info = fixture.new.verity_info();
        let mut streamed = StreamedSlot::from_written(&root, &verity).unwrap();
        // Signed, written and kept: but the hash tree of another root.
        let other = Root::new(ROOT_LEN, 3);
        let other_zst = zstd_compress(&other.hash_device);
        let entry = artifact(
            "verity.img.zst",
            ArtifactKind::VerityHashTree,
            &other_zst,
            &other.hash_device,
        );
        let written =
            write_artifact(&other_zst[..], &entry, &disk, &slot_b.verity, &mut |_| {}).unwrap();
        streamed.verity = written.written_crcs.unwrap();
        let error = check_streamed_slot(&disk, &slot_b, &info, &streamed).unwrap_err();
        assert!(
            matches!(
                &error,
                InstallError::SuperblockMismatch { .. } | InstallError::HashTreeCorrupt { .. }
            ),
            "{error}"
        );
        // CRCs of another partition are not taken for this one's.
        let mut crossed = StreamedSlot::from_written(&root, &verity).unwrap();
        crossed.verity = crossed.root.clone();
        let error = check_streamed_slot(&disk, &slot_b, &info, &crossed).unwrap_err();
        assert!(matches!(&error, InstallError::ReadBack { .. }), "{error}");
    }

    #[test]
    fn a_root_that_is_not_the_signed_tree_s_is_refused() {
        let fixture = Fixture::new();
        let disk = fixture.open();
        let slot_b = fixture.slot(Slot::B);
        // Signed bytes (length and sha256 of their own) of another root,
        // under this root's verity info.
        let mut other = fixture.new.data.clone();
        other[ROOT_LEN / 2] ^= 1;
        let other_zst = zstd_compress(&other);
        let entry = artifact(
            "root.erofs.zst",
            ArtifactKind::RootFilesystem,
            &other_zst,
            &other,
        );
        let error = write_root_artifact(
            &other_zst[..],
            &entry,
            &fixture.new.verity_info(),
            &disk,
            &slot_b.root,
            &mut |_| {},
        )
        .unwrap_err();
        assert!(
            matches!(&error, InstallError::UncompressedRootHashMismatch { artifact, expected, .. }
                if artifact == "root.erofs.zst" && *expected == fixture.new.verity_info().root_hash),
            "{error}"
        );
    }

    #[test]
    fn a_stored_root_is_hashed_once_by_its_tree() {
        // How the daemon gets a root from the fetcher: stored, its shipped
        // entry the uncompressed one. The tree checks the bytes read.
        let fixture = Fixture::new();
        let disk = fixture.open();
        let slot_b = fixture.slot(Slot::B);
        let info = fixture.new.verity_info();
        let stored = artifact(
            "root.erofs",
            ArtifactKind::RootFilesystem,
            &fixture.new.data,
            &fixture.new.data,
        );
        let write = |bytes: &[u8]| {
            write_root_artifact(bytes, &stored, &info, &disk, &slot_b.root, &mut |_| {})
        };
        let written = write(&fixture.new.data).unwrap();
        assert!(written.verity_tree.is_some() && written.uncompressed_sha256.is_none());
        let mut tampered = fixture.new.data.clone();
        tampered[4096 * 7 + 1] ^= 0x80;
        let error = write(&tampered).unwrap_err();
        assert!(
            matches!(&error, InstallError::UncompressedRootHashMismatch { .. }),
            "{error}"
        );
        let error = write(&fixture.new.data[..ROOT_LEN - 1]).unwrap_err();
        assert!(matches!(&error, InstallError::Truncated { .. }), "{error}");
    }

    #[test]
    fn piece_crcs_are_the_crcs_of_whole_buffers_whatever_the_pieces() {
        let bytes: Vec<u8> = (0..(2 * BUFFER_SIZE + 4097))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let expected: Vec<u32> = bytes.chunks(BUFFER_SIZE).map(crc32fast::hash).collect();
        let partition = Fixture::new().slot(Slot::B).root;
        for step in [1000, BUFFER_SIZE, 3 * BUFFER_SIZE] {
            let mut crcs = PieceCrcs::new();
            for piece in bytes.chunks(step) {
                crcs.update(piece);
            }
            let written = crcs.finish(&partition);
            assert_eq!(
                (written.bytes, &written.crcs),
                (bytes.len() as u64, &expected)
            );
        }
    }

    #[test]
    fn a_root_longer_than_its_tree_is_checked_by_its_sha256() {
        let fixture = Fixture::new();
        let disk = fixture.open();
        let slot_b = fixture.slot(Slot::B);
        let mut info = fixture.new.verity_info();
        info.data_blocks -= 1;
        let root = write_root_artifact(
            &fixture.root_zst[..],
            &fixture.root_artifact,
            &info,
            &disk,
            &slot_b.root,
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(root.verity_tree, None);
        assert_eq!(
            root.uncompressed_sha256.as_deref(),
            Some(fixture.root_artifact.uncompressed_sha256.as_str())
        );
    }
}
