//! dm-verity hash trees and superblocks, byte-for-byte as `veritysetup format`
//! writes them for a *separate* hash device.
//!
//! # On-disk format
//!
//! The hash device starts with one 4096-byte block whose first
//! [`SUPERBLOCK_SIZE`] bytes are the verity superblock (the rest is zero). The
//! hash tree follows from hash block `HASH_START_BLOCK` on.
//!
//! * Hash type 1 ("normal"): every digest is `sha256(salt || block)`.
//! * A hash block holds `DIGESTS_PER_HASH_BLOCK` digests back to back, its
//!   unused tail zero-filled.
//! * Level 0 holds the digests of the data blocks; level `i + 1` holds the
//!   digests of the hash blocks of level `i`; the top level is a single block.
//! * Levels are stored top level first, level 0 last.
//! * The root hash is `sha256(salt || top hash block)`.
//! * Special case (as in cryptsetup and the kernel): data of exactly one block
//!   has no hash levels at all; the root hash is the digest of that data
//!   block and the hash device is the superblock block alone.

use std::io::{self, Read, Seek, SeekFrom, Write};

use sha2::{Digest, Sha256};
use thiserror::Error;

/// Size in bytes of both data blocks and hash blocks.
pub const VERITY_BLOCK_SIZE: u64 = 4096;
/// Size in bytes of the on-disk verity superblock (it occupies the start of
/// the first hash-device block).
pub const SUPERBLOCK_SIZE: usize = 512;
/// The only hash algorithm this module writes or accepts.
pub const ALGORITHM: &str = "sha256";
/// A dm-verity root hash (sha256 digest).
pub type RootHash = [u8; 32];

/// Hash-device block index where the tree starts: block 0 holds the superblock.
pub(crate) const HASH_START_BLOCK: u64 = 1;
/// Number of sha256 digests in one 4096-byte hash block.
pub(crate) const DIGESTS_PER_HASH_BLOCK: u64 = VERITY_BLOCK_SIZE / DIGEST_SIZE as u64;
/// Largest salt the superblock can hold, in bytes.
pub(crate) const MAX_SALT_SIZE: usize = 256;

/// [`VERITY_BLOCK_SIZE`] as a `usize`, for slicing.
const BLOCK_SIZE: usize = VERITY_BLOCK_SIZE as usize;
/// Size in bytes of one sha256 digest.
const DIGEST_SIZE: usize = 32;
/// How much data is read (and hashed) per `read` round trip.
const READ_CHUNK_SIZE: usize = 1 << 20;
/// Read-ahead of the hash tree's lowest level while verifying (64 hash blocks
/// cover 32 MiB of data).
const LOWEST_LEVEL_READ_SIZE: usize = 256 << 10;
/// Domain-separation prefix of [`salt_from_content_digest`].
const SALT_DERIVATION_PREFIX: &[u8] = b"racklet-verity-salt";
/// Version field of the dm-verity superblock and of the dm table line.
const FORMAT_VERSION: u32 = 1;
/// Hash type 1: digest = hash(salt || block) ("normal", not Chrome OS).
const HASH_TYPE_NORMAL: u32 = 1;
/// What the kernel table line says for "no salt".
const EMPTY_SALT_TABLE_TEXT: &str = "-";

/// Superblock magic: "verity" padded with two NUL bytes.
const SB_SIGNATURE: &[u8; 8] = b"verity\0\0";
/// Byte offsets and sizes of the little-endian superblock fields
/// (cryptsetup's `struct verity_sb`).
const SB_SIGNATURE_OFFSET: usize = 0;
const SB_VERSION_OFFSET: usize = 8;
const SB_HASH_TYPE_OFFSET: usize = 12;
const SB_UUID_OFFSET: usize = 16;
const SB_UUID_SIZE: usize = 16;
const SB_ALGORITHM_OFFSET: usize = 32;
const SB_ALGORITHM_SIZE: usize = 32;
const SB_DATA_BLOCK_SIZE_OFFSET: usize = 64;
const SB_HASH_BLOCK_SIZE_OFFSET: usize = 68;
const SB_DATA_BLOCKS_OFFSET: usize = 72;
const SB_SALT_SIZE_OFFSET: usize = 80;
const SB_SALT_OFFSET: usize = 88;

/// Everything that can go wrong computing or checking a verity tree.
#[derive(Debug, Error)]
pub enum VerityError {
    /// An I/O operation failed; `context` says which.
    #[error("I/O error while {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The data size is not a whole number of verity blocks.
    #[error(
        "data size {size} bytes is not a multiple of the {VERITY_BLOCK_SIZE}-byte verity block size \
         ({remainder} bytes past the last whole block)",
        remainder = size % VERITY_BLOCK_SIZE
    )]
    NotBlockAligned { size: u64 },
    /// The data is empty; dm-verity needs at least one block.
    #[error("data size is 0 bytes; dm-verity needs at least one {VERITY_BLOCK_SIZE}-byte block")]
    EmptyData,
    /// The salt does not fit the superblock.
    #[error("salt is {len} bytes long; the verity superblock holds at most {MAX_SALT_SIZE}")]
    SaltTooLong { len: usize },
    /// The superblock is not one this module writes; `reason` says what was
    /// expected and what was found.
    #[error("bad verity superblock: {reason}")]
    BadSuperblock { reason: String },
    /// The top of the tree does not hash to the expected root hash (for
    /// single-block data: the data block itself does not).
    #[error(
        "root hash mismatch: expected {expected_hex}, found {found_hex}",
        expected_hex = hex::encode(expected),
        found_hex = hex::encode(found)
    )]
    RootHashMismatch { expected: RootHash, found: RootHash },
    /// A data block does not match its digest in the (root-verified) tree.
    #[error(
        "data block {block} (byte offset {offset}) is corrupt: its sha256 does not match \
         the digest the verified hash tree records for it",
        offset = block * VERITY_BLOCK_SIZE
    )]
    CorruptDataBlock { block: u64 },
    /// A hash block does not match the digest its (verified) parent records.
    #[error(
        "hash block at byte offset {offset} of the hash device (hash block {index}) is corrupt: \
         its sha256 does not match the digest its verified parent level records for it",
        index = offset / VERITY_BLOCK_SIZE
    )]
    CorruptHashBlock { offset: u64 },
    /// Text that should be a root hash is not 64 hex digits.
    #[error(
        "invalid root hash {text:?}: expected {expected_len} hex digits, found {found_len} \
         characters{non_hex}",
        expected_len = DIGEST_SIZE * 2,
        found_len = text.chars().count(),
        non_hex = if text.chars().all(|c| c.is_ascii_hexdigit()) { "" } else { " (not all hex digits)" }
    )]
    InvalidRootHashHex { text: String },
    /// More data arrived than the size the tree was made for.
    #[error("more data than the expected {expected} bytes")]
    LongerThanExpected { expected: u64 },
    /// An input ended before the expected number of bytes was read.
    #[error(
        "short read of {what}: expected {expected} bytes, found only {found} before end of input"
    )]
    ShortRead {
        what: String,
        expected: u64,
        found: u64,
    },
}

/// The dm-verity superblock at the start of the hash device.
///
/// Only `hash_type` 1, `sha256` and 4096-byte blocks are supported, so those
/// fields are implied or checked rather than free.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VeritySuperblock {
    /// UUID of the hash device, in canonical (big-endian string) byte order.
    pub uuid: [u8; 16],
    /// Data block size in bytes (always 4096 here).
    pub data_block_size: u32,
    /// Hash block size in bytes (always 4096 here).
    pub hash_block_size: u32,
    /// Number of data blocks the tree covers.
    pub data_blocks: u64,
    /// Hash algorithm name (always `sha256` here).
    pub algorithm: String,
    /// Salt prepended to every hashed block (at most 256 bytes).
    pub salt: Vec<u8>,
}

impl VeritySuperblock {
    /// A superblock for `data_blocks` 4096-byte blocks hashed with sha256.
    pub fn new(uuid: [u8; 16], data_blocks: u64, salt: Vec<u8>) -> VeritySuperblock {
        VeritySuperblock {
            uuid,
            data_block_size: VERITY_BLOCK_SIZE as u32,
            hash_block_size: VERITY_BLOCK_SIZE as u32,
            data_blocks,
            algorithm: ALGORITHM.to_string(),
            salt,
        }
    }

    /// The 512 on-disk bytes.
    ///
    /// Fields too long for their slot (an algorithm name over 32 bytes, a salt
    /// over `MAX_SALT_SIZE` bytes) are truncated; the constructors in this
    /// module never produce such values.
    pub fn to_bytes(&self) -> [u8; SUPERBLOCK_SIZE] {
        let mut bytes = [0u8; SUPERBLOCK_SIZE];
        bytes[SB_SIGNATURE_OFFSET..SB_SIGNATURE_OFFSET + SB_SIGNATURE.len()]
            .copy_from_slice(SB_SIGNATURE);
        put_u32(&mut bytes, SB_VERSION_OFFSET, FORMAT_VERSION);
        put_u32(&mut bytes, SB_HASH_TYPE_OFFSET, HASH_TYPE_NORMAL);
        bytes[SB_UUID_OFFSET..SB_UUID_OFFSET + SB_UUID_SIZE].copy_from_slice(&self.uuid);
        let algorithm = self.algorithm.as_bytes();
        let algorithm_len = algorithm.len().min(SB_ALGORITHM_SIZE);
        bytes[SB_ALGORITHM_OFFSET..SB_ALGORITHM_OFFSET + algorithm_len]
            .copy_from_slice(&algorithm[..algorithm_len]);
        put_u32(&mut bytes, SB_DATA_BLOCK_SIZE_OFFSET, self.data_block_size);
        put_u32(&mut bytes, SB_HASH_BLOCK_SIZE_OFFSET, self.hash_block_size);
        bytes[SB_DATA_BLOCKS_OFFSET..SB_DATA_BLOCKS_OFFSET + 8]
            .copy_from_slice(&self.data_blocks.to_le_bytes());
        let salt_len = self.salt.len().min(MAX_SALT_SIZE);
        bytes[SB_SALT_SIZE_OFFSET..SB_SALT_SIZE_OFFSET + 2]
            .copy_from_slice(&(salt_len as u16).to_le_bytes());
        bytes[SB_SALT_OFFSET..SB_SALT_OFFSET + salt_len].copy_from_slice(&self.salt[..salt_len]);
        bytes
    }

    /// Parses the first [`SUPERBLOCK_SIZE`] bytes of `bytes`.
    ///
    /// Checks the signature, version 1, hash type 1, algorithm `sha256`, both
    /// block sizes 4096, a non-zero data block count and a salt size of at
    /// most 256.
    pub fn parse(bytes: &[u8]) -> Result<VeritySuperblock, VerityError> {
        let bad = |reason: String| Err(VerityError::BadSuperblock { reason });
        if bytes.len() < SUPERBLOCK_SIZE {
            return bad(format!(
                "expected at least {SUPERBLOCK_SIZE} bytes, found {}",
                bytes.len()
            ));
        }
        let signature = &bytes[SB_SIGNATURE_OFFSET..SB_SIGNATURE_OFFSET + SB_SIGNATURE.len()];
        if signature != SB_SIGNATURE {
            return bad(format!(
                "expected signature {:?}, found {:?}",
                String::from_utf8_lossy(SB_SIGNATURE),
                String::from_utf8_lossy(signature)
            ));
        }
        let version = get_u32(bytes, SB_VERSION_OFFSET);
        if version != FORMAT_VERSION {
            return bad(format!(
                "expected version {FORMAT_VERSION}, found {version}"
            ));
        }
        let hash_type = get_u32(bytes, SB_HASH_TYPE_OFFSET);
        if hash_type != HASH_TYPE_NORMAL {
            return bad(format!(
                "expected hash type {HASH_TYPE_NORMAL} (normal), found {hash_type}"
            ));
        }
        let algorithm_field = &bytes[SB_ALGORITHM_OFFSET..SB_ALGORITHM_OFFSET + SB_ALGORITHM_SIZE];
        let algorithm_len = algorithm_field
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(SB_ALGORITHM_SIZE);
        let algorithm = String::from_utf8_lossy(&algorithm_field[..algorithm_len]).into_owned();
        if algorithm != ALGORITHM {
            return bad(format!(
                "expected algorithm {ALGORITHM:?}, found {algorithm:?}"
            ));
        }
        let data_block_size = get_u32(bytes, SB_DATA_BLOCK_SIZE_OFFSET);
        let hash_block_size = get_u32(bytes, SB_HASH_BLOCK_SIZE_OFFSET);
        for (name, size) in [("data", data_block_size), ("hash", hash_block_size)] {
            if u64::from(size) != VERITY_BLOCK_SIZE {
                return bad(format!(
                    "expected {name} block size {VERITY_BLOCK_SIZE}, found {size}"
                ));
            }
        }
        let data_blocks = u64::from_le_bytes(
            bytes[SB_DATA_BLOCKS_OFFSET..SB_DATA_BLOCKS_OFFSET + 8]
                .try_into()
                .expect("8-byte slice"),
        );
        if data_blocks == 0 {
            return bad("expected at least 1 data block, found 0".to_string());
        }
        // Every size derived from it (data bytes, hash device bytes) must fit in a u64.
        if data_blocks > u64::MAX / VERITY_BLOCK_SIZE / 2 {
            return bad(format!(
                "{data_blocks} data blocks is more than any device holds"
            ));
        }
        let salt_size = usize::from(u16::from_le_bytes([
            bytes[SB_SALT_SIZE_OFFSET],
            bytes[SB_SALT_SIZE_OFFSET + 1],
        ]));
        if salt_size > MAX_SALT_SIZE {
            return bad(format!(
                "expected salt size at most {MAX_SALT_SIZE}, found {salt_size}"
            ));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&bytes[SB_UUID_OFFSET..SB_UUID_OFFSET + SB_UUID_SIZE]);
        Ok(VeritySuperblock {
            uuid,
            data_block_size,
            hash_block_size,
            data_blocks,
            algorithm,
            salt: bytes[SB_SALT_OFFSET..SB_SALT_OFFSET + salt_size].to_vec(),
        })
    }

    /// Size in bytes of the data the tree covers.
    pub fn data_size_bytes(&self) -> u64 {
        self.data_blocks * u64::from(self.data_block_size)
    }
}

/// Where the tree was written and what it proves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerityTree {
    /// The superblock written at the start of the hash device.
    pub superblock: VeritySuperblock,
    /// The root hash (to pass to the kernel / `veritysetup`).
    pub root_hash: RootHash,
    /// Bytes written: the superblock block plus all hash blocks.
    pub hash_device_size_bytes: u64,
}

/// Number of bytes the hash device needs (superblock block + tree) for
/// `data_size_bytes` of data; a partial last block counts as a whole one.
pub fn hash_device_size(data_size_bytes: u64) -> u64 {
    let geometry = TreeGeometry::for_data_blocks(data_size_bytes.div_ceil(VERITY_BLOCK_SIZE));
    geometry.hash_device_size_bytes()
}

/// The salt for content whose sha256 is `content_sha256`:
/// `sha256("racklet-verity-salt" || content_sha256)`, 32 bytes.
///
/// Deterministic, so rebuilding the same image yields the same tree.
pub fn salt_from_content_digest(content_sha256: &[u8; 32]) -> Vec<u8> {
    let mut hasher = Sha256::new();
    hasher.update(SALT_DERIVATION_PREFIX);
    hasher.update(content_sha256);
    hasher.finalize().to_vec()
}

/// Reads `data_size_bytes` (a non-zero multiple of 4096) from `data`, builds
/// the tree in memory (only the hash levels, never the data) and writes
/// superblock + tree to `hash_out` starting at its current position.
pub fn build_hash_tree<R: Read, W: Write>(
    data: R,
    data_size_bytes: u64,
    salt: &[u8],
    uuid: [u8; 16],
    hash_out: W,
) -> Result<VerityTree, VerityError> {
    build_hash_tree_with_progress(data, data_size_bytes, salt, uuid, hash_out, &mut |_| {})
}

/// Like [`build_hash_tree`] but also calls `progress(bytes_done)` before the
/// first read, after every chunk read (about every MiB) and once with
/// `data_size_bytes` when all data is hashed.
pub fn build_hash_tree_with_progress<R: Read, W: Write>(
    data: R,
    data_size_bytes: u64,
    salt: &[u8],
    uuid: [u8; 16],
    hash_out: W,
    progress: &mut dyn FnMut(u64),
) -> Result<VerityTree, VerityError> {
    stream_tree(data, data_size_bytes, salt, true, progress)?.write_hash_device(uuid, hash_out)
}

/// Verifies `data` against `hash_device` (superblock at offset 0) and
/// `expected_root_hash`; both inputs are rewound to offset 0 first.
///
/// Checks, in this order: the superblock, the top hash block against the
/// root hash, every hash block above the lowest level against its parent,
/// then, streamed together, each lowest-level block against its parent and
/// every data block against its digest there. Memory holds only the upper
/// levels (1/128 of the tree, 64 KiB per GiB of data) and the read buffers.
/// Returns the superblock on success. For single-block data (no hash levels)
/// a corrupt data block is reported as [`VerityError::RootHashMismatch`],
/// since the root hash is that block's digest.
pub fn verify<R1: Read + Seek, R2: Read + Seek>(
    mut data: R1,
    mut hash_device: R2,
    expected_root_hash: &RootHash,
) -> Result<VeritySuperblock, VerityError> {
    let superblock = read_superblock(&mut hash_device)?;
    let geometry = TreeGeometry::for_data_blocks(superblock.data_blocks);
    let hasher = SaltedHasher::new(&superblock.salt);

    // The superblock is not covered by the root hash: check both lengths
    // before trusting its block count for an allocation.
    require_length(
        &mut hash_device,
        geometry.hash_device_size_bytes(),
        "the hash device",
    )?;
    require_length(&mut data, superblock.data_size_bytes(), "the data")?;
    // The levels above the lowest (1/128 of the tree) are read and checked
    // first; the lowest level (the data blocks' digests, 8 MiB per GiB of
    // data) is streamed beside the data, each of its blocks checked against
    // its parent before its digests are used, so memory stays flat.
    let level_count = geometry.level_blocks.len();
    let upper_levels_start = if level_count > 1 {
        geometry.level_start_block(level_count - 1)
    } else {
        HASH_START_BLOCK
    };
    let lowest_level_start = if level_count > 0 {
        geometry.level_start_block(0)
    } else {
        HASH_START_BLOCK
    };
    hash_device
        .seek(SeekFrom::Start(upper_levels_start * VERITY_BLOCK_SIZE))
        .map_err(|source| io_error("seeking to the hash tree", source))?;
    let mut upper_bytes =
        vec![0u8; to_usize((lowest_level_start - upper_levels_start) * VERITY_BLOCK_SIZE)?];
    read_exactly(
        &mut hash_device,
        &mut upper_bytes,
        "the hash tree's upper levels",
    )?;
    let level_byte_range = |level: usize| {
        let start = (geometry.level_start_block(level) - upper_levels_start) * VERITY_BLOCK_SIZE;
        let len = geometry.level_blocks[level] * VERITY_BLOCK_SIZE;
        start as usize..(start + len) as usize
    };
    if level_count > 1 {
        let top = &upper_bytes[level_byte_range(level_count - 1)];
        let found_root = hasher.digest(top);
        if &found_root != expected_root_hash {
            return Err(VerityError::RootHashMismatch {
                expected: *expected_root_hash,
                found: found_root,
            });
        }
        for parent_level in (2..level_count).rev() {
            let parent = &upper_bytes[level_byte_range(parent_level)];
            let child_level = parent_level - 1;
            let children = &upper_bytes[level_byte_range(child_level)];
            for (index, child) in children.chunks_exact(BLOCK_SIZE).enumerate() {
                if hasher.digest(child)[..] != parent[index * DIGEST_SIZE..][..DIGEST_SIZE] {
                    let block = geometry.level_start_block(child_level) + index as u64;
                    return Err(VerityError::CorruptHashBlock {
                        offset: block * VERITY_BLOCK_SIZE,
                    });
                }
            }
        }
    }
    // The digest each lowest-level block must have: from level 1, or the
    // root hash itself when the lowest level is the single top block.
    let lowest_parent: &[u8] = match level_count {
        0 | 1 => expected_root_hash,
        _ => &upper_bytes[level_byte_range(1)],
    };
    hash_device
        .seek(SeekFrom::Start(lowest_level_start * VERITY_BLOCK_SIZE))
        .map_err(|source| io_error("seeking to the hash tree's lowest level", source))?;
    let mut lowest_level = io::BufReader::with_capacity(LOWEST_LEVEL_READ_SIZE, hash_device);
    let mut leaf_block = vec![0u8; BLOCK_SIZE];
    let mut loaded_leaf_block: Option<u64> = None;

    data.seek(SeekFrom::Start(0))
        .map_err(|source| io_error("seeking to the start of the data", source))?;
    let mut first_block_in_chunk = 0u64;
    for_each_data_chunk(
        &mut data,
        superblock.data_size_bytes(),
        &mut |_| {},
        &mut |chunk| {
            for (index, block) in chunk.chunks_exact(BLOCK_SIZE).enumerate() {
                let block_index = first_block_in_chunk + index as u64;
                let found = hasher.digest(block);
                if level_count == 0 {
                    if found != *expected_root_hash {
                        return Err(VerityError::RootHashMismatch {
                            expected: *expected_root_hash,
                            found,
                        });
                    }
                    continue;
                }
                let leaf_index = block_index / DIGESTS_PER_HASH_BLOCK;
                if loaded_leaf_block != Some(leaf_index) {
                    // Blocks come in order: the next leaf block is the next 4 KiB.
                    read_exactly(
                        &mut lowest_level,
                        &mut leaf_block,
                        "the hash tree's lowest level",
                    )?;
                    let leaf_digest = hasher.digest(&leaf_block);
                    let expected =
                        &lowest_parent[leaf_index as usize * DIGEST_SIZE..][..DIGEST_SIZE];
                    if leaf_digest[..] != *expected {
                        return Err(if level_count == 1 {
                            VerityError::RootHashMismatch {
                                expected: *expected_root_hash,
                                found: leaf_digest,
                            }
                        } else {
                            VerityError::CorruptHashBlock {
                                offset: (lowest_level_start + leaf_index) * VERITY_BLOCK_SIZE,
                            }
                        });
                    }
                    loaded_leaf_block = Some(leaf_index);
                }
                let slot = (block_index % DIGESTS_PER_HASH_BLOCK) as usize * DIGEST_SIZE;
                if found[..] != leaf_block[slot..slot + DIGEST_SIZE] {
                    return Err(VerityError::CorruptDataBlock { block: block_index });
                }
            }
            first_block_in_chunk += (chunk.len() / BLOCK_SIZE) as u64;
            Ok(())
        },
    )?;
    Ok(superblock)
}

/// Computes only the root hash of `data_size_bytes` of `data` (reads the data
/// once, writes nothing), e.g. to re-check a written slot.
pub fn compute_root_hash<R: Read>(
    data: R,
    data_size_bytes: u64,
    salt: &[u8],
) -> Result<RootHash, VerityError> {
    Ok(*stream_tree(data, data_size_bytes, salt, false, &mut |_| {})?.root_hash())
}

/// The dm-verity tree of data that streams past once (an update being
/// written to its slot): [`StreamingTree::update`] hashes each 4096-byte block
/// as it passes, so checking the data against a signed root hash costs the
/// same one sha256 pass as checking its plain sha256, and needs no second
/// read. Memory: one hash block being filled and the digests of the
/// finished ones (1/128 of the tree, 64 KiB per GiB of data), never the data
/// or the lowest level.
pub struct StreamingTree {
    geometry: TreeGeometry,
    hasher: SaltedHasher,
    salt: Vec<u8>,
    data_size_bytes: u64,
    /// Data bytes taken so far.
    taken: u64,
    /// The start of a data block split between two updates.
    partial: Vec<u8>,
    /// The lowest-level hash block being filled (or, for one data block,
    /// that block's digest).
    lowest_block: Vec<u8>,
    lowest_filled: usize,
    /// Digests of the finished lowest-level blocks, in order.
    lowest_digests: Vec<u8>,
    /// The finished lowest-level blocks themselves, when kept
    /// ([`StreamingTree::keeping_lowest_level`]).
    lowest_level: Option<Vec<u8>>,
}

impl StreamingTree {
    /// [`StreamingTree::new`], keeping the lowest level too (1/128 of the
    /// data: 8 MiB per GiB), so [`StreamedTree::write_hash_device`] can
    /// write the whole hash device.
    pub fn keeping_lowest_level(
        data_size_bytes: u64,
        salt: &[u8],
    ) -> Result<StreamingTree, VerityError> {
        let mut tree = StreamingTree::new(data_size_bytes, salt)?;
        let lowest_blocks = tree.geometry.level_blocks.first().copied().unwrap_or(0);
        tree.lowest_level = Some(Vec::with_capacity(to_usize(
            lowest_blocks * VERITY_BLOCK_SIZE,
        )?));
        Ok(tree)
    }

    /// A tree for `data_size_bytes` (a non-zero multiple of 4096) of data
    /// hashed with `salt`.
    pub fn new(data_size_bytes: u64, salt: &[u8]) -> Result<StreamingTree, VerityError> {
        if data_size_bytes == 0 {
            return Err(VerityError::EmptyData);
        }
        if !data_size_bytes.is_multiple_of(VERITY_BLOCK_SIZE) {
            return Err(VerityError::NotBlockAligned {
                size: data_size_bytes,
            });
        }
        if salt.len() > MAX_SALT_SIZE {
            return Err(VerityError::SaltTooLong { len: salt.len() });
        }
        let geometry = TreeGeometry::for_data_blocks(data_size_bytes / VERITY_BLOCK_SIZE);
        let lowest_blocks = geometry.level_blocks.first().copied().unwrap_or(0);
        Ok(StreamingTree {
            hasher: SaltedHasher::new(salt),
            salt: salt.to_vec(),
            data_size_bytes,
            taken: 0,
            partial: Vec::with_capacity(BLOCK_SIZE),
            lowest_block: vec![0u8; BLOCK_SIZE],
            lowest_filled: 0,
            lowest_digests: Vec::with_capacity(to_usize(lowest_blocks)? * DIGEST_SIZE),
            lowest_level: None,
            geometry,
        })
    }

    /// Hashes the next `bytes` of the data. More data than the size given
    /// to [`StreamingTree::new`] is an error.
    pub fn update(&mut self, mut bytes: &[u8]) -> Result<(), VerityError> {
        if bytes.len() as u64 > self.data_size_bytes - self.taken {
            return Err(VerityError::LongerThanExpected {
                expected: self.data_size_bytes,
            });
        }
        self.taken += bytes.len() as u64;
        if !self.partial.is_empty() {
            let want = (BLOCK_SIZE - self.partial.len()).min(bytes.len());
            self.partial.extend_from_slice(&bytes[..want]);
            bytes = &bytes[want..];
            if self.partial.len() < BLOCK_SIZE {
                return Ok(());
            }
            let block = std::mem::take(&mut self.partial);
            self.add_data_block(&block);
            self.partial = block;
            self.partial.clear();
        }
        let mut blocks = bytes.chunks_exact(BLOCK_SIZE);
        for block in &mut blocks {
            self.add_data_block(block);
        }
        self.partial.extend_from_slice(blocks.remainder());
        Ok(())
    }

    fn add_data_block(&mut self, block: &[u8]) {
        let digest = self.hasher.digest(block);
        self.lowest_block[self.lowest_filled..self.lowest_filled + DIGEST_SIZE]
            .copy_from_slice(&digest);
        self.lowest_filled += DIGEST_SIZE;
        if self.lowest_filled == BLOCK_SIZE {
            self.finish_lowest_block();
        }
    }

    fn finish_lowest_block(&mut self) {
        let digest = self.hasher.digest(&self.lowest_block);
        self.lowest_digests.extend_from_slice(&digest);
        if let Some(level) = self.lowest_level.as_mut() {
            level.extend_from_slice(&self.lowest_block);
        }
        self.lowest_block.fill(0);
        self.lowest_filled = 0;
    }

    /// Data bytes hashed so far.
    pub fn bytes_taken(&self) -> u64 {
        self.taken
    }

    /// The tree of all the data: an error if less than the size given to
    /// [`StreamingTree::new`] was hashed.
    pub fn finish(mut self) -> Result<StreamedTree, VerityError> {
        if self.taken < self.data_size_bytes {
            return Err(VerityError::ShortRead {
                what: "data".to_string(),
                expected: self.data_size_bytes,
                found: self.taken,
            });
        }
        let level_count = self.geometry.level_blocks.len();
        if level_count == 0 {
            // One data block: its digest is the root hash.
            let root_hash = self.lowest_block[..DIGEST_SIZE]
                .try_into()
                .expect("one digest");
            return Ok(StreamedTree {
                geometry: self.geometry,
                salt: self.salt,
                upper_levels: Vec::new(),
                lowest_level: self.lowest_level.map(|_| Vec::new()),
                root_hash,
            });
        }
        if self.lowest_filled > 0 {
            self.finish_lowest_block();
        }
        // Levels 1 and up, from the lowest level's block digests.
        let mut upper_levels: Vec<Vec<u8>> = Vec::new();
        let mut below_digests = self.lowest_digests;
        for &blocks in &self.geometry.level_blocks[1..] {
            let mut level = below_digests;
            level.resize(to_usize(blocks * VERITY_BLOCK_SIZE)?, 0);
            below_digests = level
                .chunks_exact(BLOCK_SIZE)
                .flat_map(|block| self.hasher.digest(block))
                .collect();
            upper_levels.push(level);
        }
        let root_hash = below_digests[..DIGEST_SIZE]
            .try_into()
            .expect("the top level is one block");
        Ok(StreamedTree {
            geometry: self.geometry,
            salt: self.salt,
            upper_levels,
            lowest_level: self.lowest_level,
            root_hash,
        })
    }
}

/// The tree of streamed data ([`StreamingTree::finish`]): its root hash, and
/// enough of it to check a hash device written beside the data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamedTree {
    geometry: TreeGeometry,
    salt: Vec<u8>,
    /// Levels 1 and up (index 0 = level 1), zero-padded whole blocks.
    upper_levels: Vec<Vec<u8>>,
    /// The lowest level, if it was kept.
    lowest_level: Option<Vec<u8>>,
    root_hash: RootHash,
}

impl StreamedTree {
    /// The root hash of the streamed data.
    pub fn root_hash(&self) -> &RootHash {
        &self.root_hash
    }

    /// The digest of each lowest-level block: level 1 without its padding,
    /// the root hash for a one-level tree, nothing for one data block.
    fn lowest_block_digests(&self) -> &[u8] {
        match (
            self.upper_levels.first(),
            self.geometry.level_blocks.first(),
        ) {
            (Some(level_1), Some(&lowest_blocks)) => {
                &level_1[..lowest_blocks as usize * DIGEST_SIZE]
            }
            (None, Some(_)) => &self.root_hash,
            _ => &[],
        }
    }

    /// Writes the hash device (superblock block with `uuid`, then the levels,
    /// top first) to `hash_out`, like [`build_hash_tree`]. Needs the lowest
    /// level: a tree made by [`StreamingTree::keeping_lowest_level`].
    pub fn write_hash_device<W: Write>(
        &self,
        uuid: [u8; 16],
        mut hash_out: W,
    ) -> Result<VerityTree, VerityError> {
        let lowest_level = self.lowest_level.as_ref().ok_or_else(|| {
            io_error(
                "writing the hash device",
                io::Error::other("the tree was streamed without keeping its lowest level"),
            )
        })?;
        let superblock = VeritySuperblock::new(uuid, self.geometry.data_blocks, self.salt.clone());
        let mut superblock_block = vec![0u8; BLOCK_SIZE];
        superblock_block[..SUPERBLOCK_SIZE].copy_from_slice(&superblock.to_bytes());
        hash_out
            .write_all(&superblock_block)
            .map_err(|source| io_error("writing the verity superblock", source))?;
        for (index, level) in self.upper_levels.iter().enumerate().rev() {
            hash_out.write_all(level).map_err(|source| {
                io_error(format!("writing hash tree level {}", index + 1), source)
            })?;
        }
        hash_out
            .write_all(lowest_level)
            .map_err(|source| io_error("writing hash tree level 0", source))?;
        hash_out
            .flush()
            .map_err(|source| io_error("flushing the hash device", source))?;
        Ok(VerityTree {
            superblock,
            root_hash: self.root_hash,
            hash_device_size_bytes: self.geometry.hash_device_size_bytes(),
        })
    }

    /// Checks that `hash_device` (superblock at offset 0) is the hash
    /// device of the streamed data: its superblock's block count and salt,
    /// its upper levels byte for byte, and each lowest-level block by its
    /// digest. Reads the hash device once (1/128 of the data), hashes only
    /// its lowest level. Returns the superblock.
    pub fn check_hash_device<R: Read + Seek>(
        &self,
        mut hash_device: R,
    ) -> Result<VeritySuperblock, VerityError> {
        let superblock = read_superblock(&mut hash_device)?;
        let mut block = vec![0u8; BLOCK_SIZE];
        if superblock.data_blocks != self.geometry.data_blocks {
            return Err(VerityError::BadSuperblock {
                reason: format!(
                    "expected {} data blocks, found {}",
                    self.geometry.data_blocks, superblock.data_blocks
                ),
            });
        }
        if superblock.salt != self.salt {
            return Err(VerityError::BadSuperblock {
                reason: format!(
                    "expected salt {}, found {}",
                    hex::encode(&self.salt),
                    hex::encode(&superblock.salt)
                ),
            });
        }
        let level_count = self.geometry.level_blocks.len();
        for level in (1..level_count).rev() {
            let expected = &self.upper_levels[level - 1];
            let start = self.geometry.level_start_block(level);
            for (index, expected_block) in expected.chunks_exact(BLOCK_SIZE).enumerate() {
                read_exactly(&mut hash_device, &mut block, "the hash tree's upper levels")?;
                if block != expected_block {
                    return Err(VerityError::CorruptHashBlock {
                        offset: (start + index as u64) * VERITY_BLOCK_SIZE,
                    });
                }
            }
        }
        if level_count > 0 {
            let start = self.geometry.level_start_block(0);
            let hasher = SaltedHasher::new(&self.salt);
            let mut lowest = io::BufReader::with_capacity(LOWEST_LEVEL_READ_SIZE, &mut hash_device);
            for (index, expected) in self
                .lowest_block_digests()
                .chunks_exact(DIGEST_SIZE)
                .enumerate()
            {
                read_exactly(&mut lowest, &mut block, "the hash tree's lowest level")?;
                if hasher.digest(&block)[..] != *expected {
                    return Err(VerityError::CorruptHashBlock {
                        offset: (start + index as u64) * VERITY_BLOCK_SIZE,
                    });
                }
            }
        }
        Ok(superblock)
    }
}

/// The device-mapper `verity` target parameters (what follows
/// `0 <sectors> verity ` in a table line):
/// `1 <data_dev> <hash_dev> 4096 4096 <data_blocks> 1 sha256 <root_hex> <salt_hex>`,
/// then, if any, ` <count> <args...>`. The count is the number of
/// whitespace-separated words, so `&["restart_on_corruption"]` gives
/// ` 1 restart_on_corruption` and an element like `"fec_roots 2"` counts as
/// two. An empty salt is written as `-`.
pub fn dm_table_params(
    superblock: &VeritySuperblock,
    root_hash: &RootHash,
    data_device: &str,
    hash_device: &str,
    optional_args: &[&str],
) -> String {
    let salt_text = if superblock.salt.is_empty() {
        EMPTY_SALT_TABLE_TEXT.to_string()
    } else {
        hex::encode(&superblock.salt)
    };
    let mut params = format!(
        "{FORMAT_VERSION} {data_device} {hash_device} {} {} {} {HASH_START_BLOCK} {} {} {salt_text}",
        superblock.data_block_size,
        superblock.hash_block_size,
        superblock.data_blocks,
        superblock.algorithm,
        root_hash_to_hex(root_hash),
    );
    let words: Vec<&str> = optional_args
        .iter()
        .flat_map(|arg| arg.split_whitespace())
        .collect();
    if !words.is_empty() {
        params.push_str(&format!(" {} {}", words.len(), words.join(" ")));
    }
    params
}

/// Lower-case hex of a root hash (64 characters).
pub fn root_hash_to_hex(h: &RootHash) -> String {
    hex::encode(h)
}

/// Parses 64 hex digits (either case; surrounding whitespace ignored).
pub fn root_hash_from_hex(s: &str) -> Result<RootHash, VerityError> {
    let mut hash = [0u8; DIGEST_SIZE];
    hex::decode_to_slice(s.trim(), &mut hash).map_err(|_| VerityError::InvalidRootHashHex {
        text: s.to_string(),
    })?;
    Ok(hash)
}

/// Shape of a dm-verity hash tree for a given number of data blocks, as
/// cryptsetup's `hash_levels()` and the kernel compute it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct TreeGeometry {
    /// Number of data blocks covered.
    data_blocks: u64,
    /// Hash blocks per level; index 0 is the lowest level (digests of data
    /// blocks), the last entry is the single top block. Empty for one data
    /// block.
    level_blocks: Vec<u64>,
}

impl TreeGeometry {
    fn for_data_blocks(data_blocks: u64) -> TreeGeometry {
        let mut level_blocks = Vec::new();
        let mut blocks_below = data_blocks;
        while blocks_below > 1 {
            blocks_below = blocks_below.div_ceil(DIGESTS_PER_HASH_BLOCK);
            level_blocks.push(blocks_below);
        }
        TreeGeometry {
            data_blocks,
            level_blocks,
        }
    }

    /// Hash blocks in all levels together (not counting the superblock block).
    fn total_hash_blocks(&self) -> u64 {
        self.level_blocks.iter().sum()
    }

    /// Hash-device block index where `level` starts (levels are stored top
    /// first, after the superblock block).
    fn level_start_block(&self, level: usize) -> u64 {
        HASH_START_BLOCK + self.level_blocks[level + 1..].iter().sum::<u64>()
    }

    /// Superblock block plus all hash blocks, in bytes.
    fn hash_device_size_bytes(&self) -> u64 {
        (HASH_START_BLOCK + self.total_hash_blocks()) * VERITY_BLOCK_SIZE
    }
}

/// Reads and parses the superblock block at the start of `hash_device`,
/// leaving it positioned at the first hash block.
fn read_superblock<R: Read + Seek>(hash_device: &mut R) -> Result<VeritySuperblock, VerityError> {
    hash_device
        .seek(SeekFrom::Start(0))
        .map_err(|source| io_error("seeking to the start of the hash device", source))?;
    let mut superblock_block = vec![0u8; BLOCK_SIZE];
    read_exactly(
        hash_device,
        &mut superblock_block,
        "the hash device superblock block",
    )?;
    VeritySuperblock::parse(&superblock_block)
}

/// Streams `data_size_bytes` of `data` through a [`StreamingTree`]
/// (keeping its lowest level if `keep_lowest_level`).
fn stream_tree<R: Read>(
    mut data: R,
    data_size_bytes: u64,
    salt: &[u8],
    keep_lowest_level: bool,
    progress: &mut dyn FnMut(u64),
) -> Result<StreamedTree, VerityError> {
    let mut tree = if keep_lowest_level {
        StreamingTree::keeping_lowest_level(data_size_bytes, salt)?
    } else {
        StreamingTree::new(data_size_bytes, salt)?
    };
    for_each_data_chunk(&mut data, data_size_bytes, progress, &mut |chunk| {
        tree.update(chunk)
    })?;
    tree.finish()
}

/// sha256 with the salt already absorbed, cloned for every block.
struct SaltedHasher {
    salted: Sha256,
}

impl SaltedHasher {
    fn new(salt: &[u8]) -> SaltedHasher {
        let mut salted = Sha256::new();
        salted.update(salt);
        SaltedHasher { salted }
    }

    /// `sha256(salt || block)`.
    fn digest(&self, block: &[u8]) -> [u8; DIGEST_SIZE] {
        let mut hasher = self.salted.clone();
        hasher.update(block);
        hasher.finalize().into()
    }
}

/// Reads exactly `total_bytes` from `data` in chunks of up to
/// [`READ_CHUNK_SIZE`] (each a whole number of blocks, since `total_bytes` is
/// block-aligned), handing each to `consume` and reporting progress.
fn for_each_data_chunk<R: Read>(
    data: &mut R,
    total_bytes: u64,
    progress: &mut dyn FnMut(u64),
    consume: &mut dyn FnMut(&[u8]) -> Result<(), VerityError>,
) -> Result<(), VerityError> {
    let mut chunk = vec![0u8; total_bytes.min(READ_CHUNK_SIZE as u64) as usize];
    let mut done = 0u64;
    progress(done);
    while done < total_bytes {
        let len = (total_bytes - done).min(chunk.len() as u64) as usize;
        let got = read_until_full_or_eof(data, &mut chunk[..len])
            .map_err(|source| io_error(format!("reading data at byte offset {done}"), source))?;
        if got < len {
            return Err(VerityError::ShortRead {
                what: "data".to_string(),
                expected: total_bytes,
                found: done + got as u64,
            });
        }
        consume(&chunk[..len])?;
        done += len as u64;
        progress(done);
    }
    Ok(())
}

/// Errors with [`VerityError::ShortRead`] if `input` is shorter than
/// `required_bytes` (its position afterwards is unspecified).
fn require_length<S: Seek>(
    input: &mut S,
    required_bytes: u64,
    what: &str,
) -> Result<(), VerityError> {
    let length = input
        .seek(SeekFrom::End(0))
        .map_err(|source| io_error(format!("seeking to the end of {what}"), source))?;
    if length < required_bytes {
        return Err(VerityError::ShortRead {
            what: what.to_string(),
            expected: required_bytes,
            found: length,
        });
    }
    Ok(())
}

/// Fills `buf` completely or errors with [`VerityError::ShortRead`] naming `what`.
fn read_exactly<R: Read>(reader: &mut R, buf: &mut [u8], what: &str) -> Result<(), VerityError> {
    let got = read_until_full_or_eof(reader, buf)
        .map_err(|source| io_error(format!("reading {what}"), source))?;
    if got < buf.len() {
        return Err(VerityError::ShortRead {
            what: what.to_string(),
            expected: buf.len() as u64,
            found: got as u64,
        });
    }
    Ok(())
}

/// Reads until `buf` is full or the reader hits end of input; returns the
/// number of bytes read. Retries interrupted reads.
fn read_until_full_or_eof<R: Read>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(filled)
}

/// A tree size as an in-memory length, or an error if it cannot be one.
fn to_usize(len: u64) -> Result<usize, VerityError> {
    usize::try_from(len).map_err(|_| {
        io_error(
            "allocating the hash tree",
            io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!("expected a tree size addressable in memory, found {len} bytes"),
            ),
        )
    })
}

fn io_error(context: impl Into<String>, source: io::Error) -> VerityError {
    VerityError::Io {
        context: context.into(),
        source,
    }
}

fn put_u32(bytes: &mut [u8], offset: usize, value: u32) {
    bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
}

fn get_u32(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(bytes[offset..offset + 4].try_into().expect("4-byte slice"))
}

/// The dm-verity superblock UUID of the hash device for a root file system
/// whose sha256 is `root_sha256`: what the image builder writes, and what a
/// node that rebuilds the hash device itself (a delta install) writes, so both
/// are byte for byte the same. The root hash does not cover it.
pub fn hash_device_uuid(root_sha256: &[u8; 32]) -> crate::gpt::Guid {
    crate::gpt::Guid::derive_from_parts(&[b"racklet-verity", root_sha256])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    const TEST_UUID: [u8; 16] = [
        0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd,
        0xef,
    ];
    const TEST_SALT: &[u8] = &[0x00, 0x11, 0x22, 0x33, 0x44];

    /// Deterministic pseudo-random bytes (xorshift64).
    fn pseudo_random_data(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect()
    }

    fn build(data: &[u8], salt: &[u8]) -> (VerityTree, Vec<u8>) {
        let mut hash_device = Vec::new();
        let tree =
            build_hash_tree(data, data.len() as u64, salt, TEST_UUID, &mut hash_device).unwrap();
        (tree, hash_device)
    }

    fn run_verify(
        data: &[u8],
        hash_device: &[u8],
        root: &RootHash,
    ) -> Result<VeritySuperblock, VerityError> {
        verify(Cursor::new(data), Cursor::new(hash_device), root)
    }

    fn sample_superblock() -> VeritySuperblock {
        VeritySuperblock::new(TEST_UUID, 129, TEST_SALT.to_vec())
    }

    #[test]
    fn superblock_round_trips_and_has_cryptsetup_layout() {
        let superblock = sample_superblock();
        let bytes = superblock.to_bytes();
        assert_eq!(&bytes[..8], b"verity\0\0");
        assert_eq!(&bytes[8..16], &[1, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(&bytes[16..32], &TEST_UUID);
        assert_eq!(&bytes[32..40], b"sha256\0\0");
        assert_eq!(&bytes[64..72], &[0, 0x10, 0, 0, 0, 0x10, 0, 0]);
        assert_eq!(&bytes[72..80], &129u64.to_le_bytes());
        assert_eq!(&bytes[80..82], &[5, 0]);
        assert_eq!(&bytes[88..93], TEST_SALT);
        assert!(bytes[93..].iter().all(|&b| b == 0));
        assert_eq!(VeritySuperblock::parse(&bytes).unwrap(), superblock);
        assert_eq!(superblock.data_size_bytes(), 129 * 4096);
    }

    #[test]
    fn superblock_parse_rejects_unsupported_fields() {
        let good = sample_superblock().to_bytes();
        let expect_reason = |bytes: &[u8], needle: &str| match VeritySuperblock::parse(bytes) {
            Err(VerityError::BadSuperblock { reason }) => {
                assert!(reason.contains(needle), "{reason:?} lacks {needle:?}")
            }
            other => panic!("expected BadSuperblock({needle}), got {other:?}"),
        };
        expect_reason(&good[..100], "expected at least 512 bytes, found 100");

        let mut bytes = good;
        bytes[0] = b'V';
        expect_reason(&bytes, "expected signature");

        let mut bytes = good;
        bytes[8] = 2;
        expect_reason(&bytes, "expected version 1, found 2");

        let mut bytes = good;
        bytes[12] = 0;
        expect_reason(&bytes, "expected hash type 1 (normal), found 0");

        let mut bytes = good;
        bytes[32..40].copy_from_slice(b"sha1\0\0\0\0");
        expect_reason(&bytes, "expected algorithm \"sha256\", found \"sha1\"");

        let mut bytes = good;
        put_u32(&mut bytes, 64, 512);
        expect_reason(&bytes, "expected data block size 4096, found 512");

        let mut bytes = good;
        put_u32(&mut bytes, 68, 1024);
        expect_reason(&bytes, "expected hash block size 4096, found 1024");

        let mut bytes = good;
        bytes[72..80].copy_from_slice(&0u64.to_le_bytes());
        expect_reason(&bytes, "expected at least 1 data block, found 0");

        let mut bytes = good;
        bytes[80..82].copy_from_slice(&300u16.to_le_bytes());
        expect_reason(&bytes, "expected salt size at most 256, found 300");
    }

    #[test]
    fn level_geometry_matches_cryptsetup() {
        let cases: &[(u64, &[u64])] = &[
            (1, &[]),
            (2, &[1]),
            (128, &[1]),
            (129, &[2, 1]),
            (128 * 128, &[128, 1]),
            (128 * 128 + 1, &[129, 2, 1]),
        ];
        for &(data_blocks, expected_levels) in cases {
            let geometry = TreeGeometry::for_data_blocks(data_blocks);
            assert_eq!(
                geometry.level_blocks, expected_levels,
                "{data_blocks} blocks"
            );
            let total: u64 = expected_levels.iter().sum();
            assert_eq!(
                hash_device_size(data_blocks * VERITY_BLOCK_SIZE),
                (1 + total) * VERITY_BLOCK_SIZE
            );
        }
        // Top level first, right after the superblock block.
        let geometry = TreeGeometry::for_data_blocks(128 * 128 + 1);
        assert_eq!(geometry.level_start_block(2), 1);
        assert_eq!(geometry.level_start_block(1), 2);
        assert_eq!(geometry.level_start_block(0), 4);
        // A partial block counts as a whole one.
        assert_eq!(hash_device_size(4097), 2 * VERITY_BLOCK_SIZE);
    }

    #[test]
    fn single_block_root_is_the_salted_block_digest() {
        let data = pseudo_random_data(BLOCK_SIZE, 7);
        let (tree, hash_device) = build(&data, TEST_SALT);
        let mut hasher = Sha256::new();
        hasher.update(TEST_SALT);
        hasher.update(&data);
        let expected: RootHash = hasher.finalize().into();
        assert_eq!(tree.root_hash, expected);
        assert_eq!(hash_device.len(), BLOCK_SIZE);
        assert_eq!(tree.hash_device_size_bytes, VERITY_BLOCK_SIZE);
    }

    #[test]
    fn two_level_tree_layout_by_hand() {
        let data = pseudo_random_data(129 * BLOCK_SIZE, 3);
        let (tree, hash_device) = build(&data, TEST_SALT);
        assert_eq!(hash_device.len() as u64, tree.hash_device_size_bytes);
        assert_eq!(hash_device.len(), 4 * BLOCK_SIZE);
        let digest = |bytes: &[u8]| SaltedHasher::new(TEST_SALT).digest(bytes);
        // Block 1: top level, digests of the two level-0 blocks (2 and 3).
        let top = &hash_device[BLOCK_SIZE..2 * BLOCK_SIZE];
        assert_eq!(
            &top[..32],
            &digest(&hash_device[2 * BLOCK_SIZE..3 * BLOCK_SIZE])
        );
        assert_eq!(&top[32..64], &digest(&hash_device[3 * BLOCK_SIZE..]));
        assert!(top[64..].iter().all(|&b| b == 0));
        // Last level-0 block: digest of data block 128, then zeros.
        let last_leaf_block = &hash_device[3 * BLOCK_SIZE..];
        assert_eq!(&last_leaf_block[..32], &digest(&data[128 * BLOCK_SIZE..]));
        assert!(last_leaf_block[32..].iter().all(|&b| b == 0));
        assert_eq!(tree.root_hash, digest(top));
        assert_eq!(
            compute_root_hash(&data[..], data.len() as u64, TEST_SALT).unwrap(),
            tree.root_hash
        );
        assert_eq!(
            VeritySuperblock::parse(&hash_device).unwrap(),
            tree.superblock
        );
    }

    #[test]
    fn build_rejects_bad_sizes_salts_and_short_data() {
        let data = vec![0u8; 3 * BLOCK_SIZE];
        let err = build_hash_tree(&data[..], 4097, &[], TEST_UUID, io::sink()).unwrap_err();
        assert!(
            matches!(err, VerityError::NotBlockAligned { size: 4097 }),
            "{err}"
        );
        assert!(err.to_string().contains("4097"), "{err}");
        let err = build_hash_tree(&data[..], 0, &[], TEST_UUID, io::sink()).unwrap_err();
        assert!(matches!(err, VerityError::EmptyData), "{err}");
        let err = build_hash_tree(&data[..], 4096, &[0; 257], TEST_UUID, io::sink()).unwrap_err();
        assert!(
            matches!(err, VerityError::SaltTooLong { len: 257 }),
            "{err}"
        );
        let err = build_hash_tree(&data[..], 4 * VERITY_BLOCK_SIZE, &[], TEST_UUID, io::sink())
            .unwrap_err();
        assert!(
            matches!(
                err,
                VerityError::ShortRead {
                    expected: 16384,
                    found: 12288,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn progress_is_monotonic_and_ends_at_the_data_size() {
        let data = vec![0u8; 3 * READ_CHUNK_SIZE + BLOCK_SIZE];
        let mut reports = Vec::new();
        build_hash_tree_with_progress(
            &data[..],
            data.len() as u64,
            TEST_SALT,
            TEST_UUID,
            io::sink(),
            &mut |done| reports.push(done),
        )
        .unwrap();
        assert_eq!(reports.first(), Some(&0));
        assert_eq!(reports.last(), Some(&(data.len() as u64)));
        assert!(reports.windows(2).all(|pair| pair[0] < pair[1]));
        assert!(reports.len() >= 5);
    }

    #[test]
    fn verify_accepts_a_good_tree_and_locates_corruption() {
        let data = pseudo_random_data(129 * BLOCK_SIZE, 11);
        let (tree, hash_device) = build(&data, TEST_SALT);
        let superblock = run_verify(&data, &hash_device, &tree.root_hash).unwrap();
        assert_eq!(superblock, tree.superblock);

        let mut bad_data = data.clone();
        bad_data[100 * BLOCK_SIZE + 17] ^= 0x01;
        let err = run_verify(&bad_data, &hash_device, &tree.root_hash).unwrap_err();
        assert!(
            matches!(err, VerityError::CorruptDataBlock { block: 100 }),
            "{err}"
        );
        assert!(err.to_string().contains("data block 100"), "{err}");

        // Level 0 occupies hash blocks 2 and 3; corrupt block 3.
        let mut bad_hash = hash_device.clone();
        bad_hash[3 * BLOCK_SIZE + 5] ^= 0x80;
        let err = run_verify(&data, &bad_hash, &tree.root_hash).unwrap_err();
        assert!(
            matches!(err, VerityError::CorruptHashBlock { offset: 12288 }),
            "{err}"
        );

        // The top block is covered by the root hash itself.
        let mut bad_top = hash_device.clone();
        bad_top[BLOCK_SIZE + 4000] ^= 0x01;
        let err = run_verify(&data, &bad_top, &tree.root_hash).unwrap_err();
        assert!(matches!(err, VerityError::RootHashMismatch { .. }), "{err}");

        let mut wrong_root = tree.root_hash;
        wrong_root[0] ^= 0xff;
        let err = run_verify(&data, &hash_device, &wrong_root).unwrap_err();
        match &err {
            VerityError::RootHashMismatch { expected, found } => {
                assert_eq!(expected, &wrong_root);
                assert_eq!(found, &tree.root_hash);
            }
            other => panic!("expected RootHashMismatch, got {other:?}"),
        }
        let message = err.to_string();
        assert!(
            message.contains(&root_hash_to_hex(&wrong_root)),
            "{message}"
        );
        assert!(
            message.contains(&root_hash_to_hex(&tree.root_hash)),
            "{message}"
        );

        let err = run_verify(&data[..BLOCK_SIZE * 50], &hash_device, &tree.root_hash).unwrap_err();
        assert!(matches!(err, VerityError::ShortRead { .. }), "{err}");
        let err = run_verify(&data, &hash_device[..BLOCK_SIZE * 2], &tree.root_hash).unwrap_err();
        assert!(matches!(err, VerityError::ShortRead { .. }), "{err}");

        // A tampered block count must not turn into a huge allocation.
        let mut huge_count = hash_device.clone();
        huge_count[72..80].copy_from_slice(&(1u64 << 50).to_le_bytes());
        let err = run_verify(&data, &huge_count, &tree.root_hash).unwrap_err();
        assert!(
            matches!(&err, VerityError::ShortRead { what, found: 16384, .. } if what == "the hash device"),
            "{err}"
        );
        // One whose byte sizes would overflow is refused outright.
        huge_count[72..80].copy_from_slice(&u64::MAX.to_le_bytes());
        let err = run_verify(&data, &huge_count, &tree.root_hash).unwrap_err();
        assert!(matches!(&err, VerityError::BadSuperblock { .. }), "{err}");
    }

    #[test]
    fn verify_one_level_tree() {
        // 100 data blocks: the lowest level is the single top block.
        let data = pseudo_random_data(100 * BLOCK_SIZE, 3);
        let (tree, hash_device) = build(&data, TEST_SALT);
        run_verify(&data, &hash_device, &tree.root_hash).unwrap();
        let mut bad_data = data.clone();
        bad_data[99 * BLOCK_SIZE] ^= 1;
        let err = run_verify(&bad_data, &hash_device, &tree.root_hash).unwrap_err();
        assert!(
            matches!(err, VerityError::CorruptDataBlock { block: 99 }),
            "{err}"
        );
        let mut bad_top = hash_device.clone();
        bad_top[BLOCK_SIZE + 7] ^= 1;
        let err = run_verify(&data, &bad_top, &tree.root_hash).unwrap_err();
        assert!(matches!(err, VerityError::RootHashMismatch { .. }), "{err}");
    }

    #[test]
    fn verify_three_level_tree_streams_the_lowest_level() {
        // 128 * 128 + 1 data blocks: levels of 129, 2 and 1 hash blocks,
        // stored top first: top at block 1, level 1 at 2-3, level 0 at 4-132.
        let blocks = 128 * 128 + 1;
        let data = pseudo_random_data(blocks * BLOCK_SIZE, 9);
        let (tree, hash_device) = build(&data, TEST_SALT);
        assert_eq!(hash_device.len(), 133 * BLOCK_SIZE);
        run_verify(&data, &hash_device, &tree.root_hash).unwrap();

        let mut bad_data = data.clone();
        bad_data[(blocks - 1) * BLOCK_SIZE + 9] ^= 1;
        let err = run_verify(&bad_data, &hash_device, &tree.root_hash).unwrap_err();
        assert!(
            matches!(err, VerityError::CorruptDataBlock { block } if block == blocks as u64 - 1),
            "{err}"
        );
        for (hash_block, what) in [(3, "level 1"), (4, "first leaf"), (132, "last leaf")] {
            let mut bad_hash = hash_device.clone();
            bad_hash[hash_block * BLOCK_SIZE + 100] ^= 0x40;
            let err = run_verify(&data, &bad_hash, &tree.root_hash).unwrap_err();
            assert!(
                matches!(err, VerityError::CorruptHashBlock { offset } if offset == (hash_block * BLOCK_SIZE) as u64),
                "{what}: {err}"
            );
        }
    }

    #[test]
    fn verify_single_block_data() {
        let data = pseudo_random_data(BLOCK_SIZE, 5);
        let (tree, hash_device) = build(&data, &[]);
        run_verify(&data, &hash_device, &tree.root_hash).unwrap();
        let mut bad_data = data.clone();
        bad_data[0] ^= 1;
        let err = run_verify(&bad_data, &hash_device, &tree.root_hash).unwrap_err();
        assert!(matches!(err, VerityError::RootHashMismatch { .. }), "{err}");
    }

    #[test]
    fn dm_table_params_format() {
        let superblock = sample_superblock();
        let root = [0xabu8; 32];
        let root_hex = "ab".repeat(32);
        assert_eq!(
            dm_table_params(&superblock, &root, "/dev/vda3", "/dev/vda4", &[]),
            format!("1 /dev/vda3 /dev/vda4 4096 4096 129 1 sha256 {root_hex} 0011223344")
        );
        assert_eq!(
            dm_table_params(&superblock, &root, "8:3", "8:4", &["restart_on_corruption"]),
            format!(
                "1 8:3 8:4 4096 4096 129 1 sha256 {root_hex} 0011223344 1 restart_on_corruption"
            )
        );
        let unsalted = VeritySuperblock::new(TEST_UUID, 1, Vec::new());
        assert_eq!(
            dm_table_params(
                &unsalted,
                &root,
                "a",
                "b",
                &["panic_on_corruption", "fec_roots 2"]
            ),
            format!("1 a b 4096 4096 1 1 sha256 {root_hex} - 3 panic_on_corruption fec_roots 2")
        );
    }

    #[test]
    fn root_hash_hex_round_trip_and_errors() {
        let root: RootHash = core::array::from_fn(|i| (i * 7) as u8);
        let text = root_hash_to_hex(&root);
        assert_eq!(text.len(), 64);
        assert_eq!(root_hash_from_hex(&text).unwrap(), root);
        assert_eq!(root_hash_from_hex(&text.to_uppercase()).unwrap(), root);
        assert_eq!(root_hash_from_hex(&format!(" {text}\n")).unwrap(), root);

        let err = root_hash_from_hex("abcd").unwrap_err();
        assert!(matches!(&err, VerityError::InvalidRootHashHex { text } if text == "abcd"));
        assert!(
            err.to_string().contains("expected 64 hex digits, found 4"),
            "{err}"
        );
        let not_hex = "zz".repeat(32);
        let err = root_hash_from_hex(&not_hex).unwrap_err();
        assert!(err.to_string().contains("not all hex digits"), "{err}");
    }

    #[test]
    fn salt_from_content_digest_is_prefixed_sha256() {
        let content = [9u8; 32];
        let salt = salt_from_content_digest(&content);
        let mut hasher = Sha256::new();
        hasher.update(b"racklet-verity-salt");
        hasher.update(content);
        assert_eq!(salt, hasher.finalize().to_vec());
        assert_eq!(salt.len(), 32);
        assert_ne!(salt, salt_from_content_digest(&[8u8; 32]));
    }

    #[test]
    fn hash_device_uuid_is_the_length_prefixed_rule() {
        let digest = [7u8; 32];
        let mut seed = Vec::new();
        seed.extend_from_slice(&14u64.to_le_bytes());
        seed.extend_from_slice(b"racklet-verity");
        seed.extend_from_slice(&32u64.to_le_bytes());
        seed.extend_from_slice(&digest);
        assert_eq!(hash_device_uuid(&digest), crate::gpt::Guid::derive(&seed));
        assert_ne!(hash_device_uuid(&digest), hash_device_uuid(&[8u8; 32]));
    }

    /// The tree of `data` streamed in pieces of `step` bytes.
    fn streamed(data: &[u8], salt: &[u8], step: usize) -> StreamedTree {
        let mut tree = StreamingTree::new(data.len() as u64, salt).unwrap();
        for piece in data.chunks(step) {
            tree.update(piece).unwrap();
        }
        assert_eq!(tree.bytes_taken(), data.len() as u64);
        tree.finish().unwrap()
    }

    #[test]
    fn a_streamed_tree_is_the_built_one_and_checks_its_hash_device() {
        // One block (no levels), one level, two levels, three levels; pieces
        // that split blocks and pieces of many blocks.
        for blocks in [1usize, 2, 129, 128 * 128 + 3] {
            let data = pseudo_random_data(blocks * BLOCK_SIZE, blocks as u64);
            let (built, hash_device) = build(&data, TEST_SALT);
            let steps: &[usize] = if blocks > 1000 {
                &[3 * BLOCK_SIZE + 17]
            } else {
                &[1000, BLOCK_SIZE, 3 * BLOCK_SIZE + 17, 1 << 20]
            };
            for &step in steps {
                let tree = streamed(&data, TEST_SALT, step);
                assert_eq!(
                    tree.root_hash(),
                    &built.root_hash,
                    "{blocks} blocks, step {step}"
                );
                let superblock = tree.check_hash_device(Cursor::new(&hash_device)).unwrap();
                assert_eq!(superblock, built.superblock);
            }
        }
    }

    #[test]
    fn a_streamed_tree_writes_the_built_hash_device() {
        for blocks in [1usize, 2, 129, 128 * 128 + 3] {
            let data = pseudo_random_data(blocks * BLOCK_SIZE, 77 + blocks as u64);
            let (built, hash_device) = build(&data, TEST_SALT);
            let mut tree =
                StreamingTree::keeping_lowest_level(data.len() as u64, TEST_SALT).unwrap();
            tree.update(&data).unwrap();
            let tree = tree.finish().unwrap();
            let mut written = Vec::new();
            assert_eq!(
                tree.write_hash_device(TEST_UUID, &mut written).unwrap(),
                built
            );
            assert!(
                written == hash_device,
                "{blocks} blocks: another hash device"
            );
        }
        // Without the lowest level it says so.
        let data = pseudo_random_data(3 * BLOCK_SIZE, 1);
        let error = streamed(&data, TEST_SALT, BLOCK_SIZE)
            .write_hash_device(TEST_UUID, Vec::new())
            .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("without keeping its lowest level"),
            "{error}"
        );
    }

    #[test]
    fn a_hash_device_that_is_not_the_streamed_data_s_is_named() {
        let data = pseudo_random_data(128 * 128 * BLOCK_SIZE + 5 * BLOCK_SIZE, 9);
        let (_, hash_device) = build(&data, TEST_SALT);
        let tree = streamed(&data, TEST_SALT, 1 << 20);
        let geometry = TreeGeometry::for_data_blocks((data.len() / BLOCK_SIZE) as u64);
        // A byte of the top level, of level 1 and of the lowest level.
        for level in [2usize, 1, 0] {
            let block = geometry.level_start_block(level);
            let mut damaged = hash_device.clone();
            damaged[block as usize * BLOCK_SIZE + 40] ^= 1;
            let error = tree.check_hash_device(Cursor::new(&damaged)).unwrap_err();
            assert!(
                matches!(error, VerityError::CorruptHashBlock { offset } if offset == block * VERITY_BLOCK_SIZE),
                "level {level}: {error}"
            );
        }
        // Another salt, another block count, a short device.
        let (_, other_salt) = build(&data, &[9, 9]);
        let error = tree
            .check_hash_device(Cursor::new(&other_salt))
            .unwrap_err();
        assert!(
            error.to_string().contains("expected salt 0011223344"),
            "{error}"
        );
        let (_, shorter) = build(&data[..data.len() - BLOCK_SIZE], TEST_SALT);
        let error = tree.check_hash_device(Cursor::new(&shorter)).unwrap_err();
        assert!(error.to_string().contains("data blocks"), "{error}");
        let error = tree
            .check_hash_device(Cursor::new(&hash_device[..hash_device.len() - 1]))
            .unwrap_err();
        assert!(matches!(error, VerityError::ShortRead { .. }), "{error}");
    }

    #[test]
    fn a_streaming_tree_refuses_more_or_less_data_than_its_size() {
        let data = pseudo_random_data(3 * BLOCK_SIZE, 4);
        let mut tree = StreamingTree::new(2 * VERITY_BLOCK_SIZE, TEST_SALT).unwrap();
        let error = tree.update(&data).unwrap_err();
        assert!(
            matches!(error, VerityError::LongerThanExpected { expected } if expected == 2 * VERITY_BLOCK_SIZE)
        );
        let mut tree = StreamingTree::new(2 * VERITY_BLOCK_SIZE, TEST_SALT).unwrap();
        tree.update(&data[..BLOCK_SIZE + 1]).unwrap();
        let error = tree.finish().err().unwrap();
        assert!(
            matches!(error, VerityError::ShortRead { found, .. } if found == VERITY_BLOCK_SIZE + 1)
        );
        assert!(matches!(
            StreamingTree::new(4095, TEST_SALT),
            Err(VerityError::NotBlockAligned { .. })
        ));
        assert!(matches!(
            StreamingTree::new(0, TEST_SALT),
            Err(VerityError::EmptyData)
        ));
    }
}
