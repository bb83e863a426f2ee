//! GUID Partition Table (GPT) reading and writing.
//!
//! The image builder uses this module to write the partition table of `disk.img`;
//! the update agent and the initramfs use it to find partitions by their unique
//! GUID on a real disk or on a disk image file. It only needs `Read`/`Write`/`Seek`,
//! so it works the same on a file, a block device or an in-memory buffer.
//!
//! Terms used throughout:
//! - *GUID*: a 128-bit globally unique identifier (the same thing as a UUID).
//! - *LBA* (logical block address): the index of a 512-byte sector on the disk.
//! - *MBR* (master boot record): the legacy partition table in LBA 0. A GPT disk
//!   carries a *protective* MBR there, which claims the whole disk with one
//!   partition of type `0xEE` so that legacy tools leave the disk alone.
//! - *CRC*: the CRC-32 checksum (IEEE polynomial) that protects the GPT headers
//!   and the partition entry array.
//!
//! On-disk layout written by [`GptDisk::write`] (N = number of sectors on the disk):
//!
//! | LBA            | contents                                  |
//! |----------------|-------------------------------------------|
//! | 0              | protective MBR                            |
//! | 1              | primary GPT header                        |
//! | 2 ..= 33       | primary partition entry array (128 × 128) |
//! | 34 ..= N-34    | usable area (partitions)                  |
//! | N-33 ..= N-2   | backup partition entry array              |
//! | N-1            | backup GPT header                         |
//!
//! Only disks with 512-byte logical sectors are supported.
//!
//! Writing is deterministic: the bytes written are a pure function of the
//! [`GptDisk`] value.
//!
//! [`patch_unique_guids`] changes the unique GUIDs of some entries of an existing
//! table in place, crash-safely: only those GUID fields and the CRCs change, one
//! copy of the table at a time.

use std::fmt;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::str::FromStr;

use sha2::{Digest, Sha256};
use thiserror::Error;

/// Size of one logical sector (one LBA) in bytes.
pub const SECTOR_SIZE: u64 = 512;
/// Number of entries in the partition entry arrays this module writes.
pub(crate) const PARTITION_ENTRY_COUNT: u32 = 128;
/// Size of one partition entry in bytes, as written by this module.
pub(crate) const ENTRY_SIZE: u32 = 128;

/// Attribute bit 0: the platform requires this partition to function.
pub const ATTRIBUTE_REQUIRED: u64 = 1 << 0;
/// Attribute bit 60 (Discoverable Partitions Specification): mount read-only.
pub const ATTRIBUTE_READ_ONLY: u64 = 1 << 60;
/// Attribute bit 59 (Discoverable Partitions Specification): grow the file system to the partition size.
pub const ATTRIBUTE_GROWFS: u64 = 1 << 59;

/// Alignment of partition starts and sizes chosen by [`GptDisk::plan`]: 1 MiB.
pub(crate) const PARTITION_ALIGNMENT_BYTES: u64 = 1024 * 1024;
/// Maximum length of a partition name, in UTF-16 code units.
pub(crate) const MAX_NAME_UTF16_UNITS: usize = 36;

/// The 8-byte signature that starts every GPT header.
const HEADER_SIGNATURE: [u8; 8] = *b"EFI PART";
/// GPT revision 1.0, the only revision defined by the UEFI specification.
const HEADER_REVISION_1_0: u32 = 0x0001_0000;
/// Size of the defined part of the GPT header in bytes; the rest of its sector is zero.
const HEADER_SIZE: u32 = 92;
/// Byte offset of the header CRC field inside the header.
const HEADER_CRC_OFFSET: usize = 16;
/// Byte offset of the header's own LBA inside the header.
const HEADER_MY_LBA_OFFSET: usize = 24;
/// Byte offset of the other header's LBA inside the header.
const HEADER_ALTERNATE_LBA_OFFSET: usize = 32;
/// Byte offset of the entry array's first LBA inside the header.
const HEADER_ENTRIES_LBA_OFFSET: usize = 72;
/// Byte offset of the entry array CRC inside the header.
const HEADER_ENTRIES_CRC_OFFSET: usize = 88;
/// Byte offset of the unique GUID inside a partition entry.
const ENTRY_UNIQUE_GUID_OFFSET: usize = 16;
/// LBA of the protective MBR.
const MBR_LBA: u64 = 0;
/// LBA of the primary GPT header.
const PRIMARY_HEADER_LBA: u64 = 1;
/// LBA where the primary partition entry array starts.
const PRIMARY_ENTRIES_LBA: u64 = 2;
/// Number of sectors taken by one partition entry array of 128 entries of 128 bytes.
const ENTRY_ARRAY_SECTORS: u64 = PARTITION_ENTRY_COUNT as u64 * ENTRY_SIZE as u64 / SECTOR_SIZE;
/// Number of sectors at each end of the disk that the GPT itself occupies
/// (MBR + primary header + entries at the start; entries + backup header at the end).
const RESERVED_SECTORS_AT_EACH_END: u64 = 2 + ENTRY_ARRAY_SECTORS;
/// The smallest disk that can hold a GPT with one usable sector, in sectors.
const MINIMUM_DISK_SECTORS: u64 = 2 * RESERVED_SECTORS_AT_EACH_END;
/// Largest partition entry array this reader accepts, in bytes (guards memory use
/// against a corrupted entry count that still passes the header CRC).
const MAX_ENTRY_ARRAY_BYTES: u64 = 4 * 1024 * 1024;

/// MBR partition type that marks a protective MBR.
const PROTECTIVE_MBR_PARTITION_TYPE: u8 = 0xEE;
/// Byte offset of the disk signature in the MBR.
const MBR_DISK_SIGNATURE_OFFSET: usize = 440;
/// Byte offset of the first of the four MBR partition records.
const MBR_PARTITION_TABLE_OFFSET: usize = 446;
/// Size of one MBR partition record in bytes.
const MBR_PARTITION_RECORD_SIZE: usize = 16;
/// Number of partition records in an MBR.
const MBR_PARTITION_RECORD_COUNT: usize = 4;
/// Byte offset of the boot signature at the end of the MBR.
const MBR_BOOT_SIGNATURE_OFFSET: usize = 510;
/// The boot signature bytes that end a valid MBR.
const MBR_BOOT_SIGNATURE: [u8; 2] = [0x55, 0xAA];
/// Heads per cylinder of the conventional geometry used to fill the MBR CHS
/// (cylinder/head/sector) fields.
const CHS_HEADS_PER_CYLINDER: u64 = 255;
/// Sectors per track of the conventional geometry used for the MBR CHS fields.
const CHS_SECTORS_PER_TRACK: u64 = 63;
/// Largest cylinder number representable in an MBR CHS field.
const CHS_MAX_CYLINDER: u64 = 1023;
/// CHS value meaning "not representable" in an MBR partition record.
const CHS_NOT_REPRESENTABLE: [u8; 3] = [0xFF, 0xFF, 0xFF];

/// A GUID/UUID, stored in canonical RFC 4122 byte order (the order of the hex
/// digits in its string form).
///
/// GPT stores GUIDs on disk in a mixed-endian form; use `Guid::to_gpt_bytes` and
/// `Guid::from_gpt_bytes` to convert. The text form and both byte orders are
/// the `uuid` crate's ([`uuid::Uuid`]); this type adds what GPT needs on top.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Guid(pub [u8; 16]);

/// The only text form [`Guid::parse`] accepts, as `GptError::InvalidGuid` says it.
const GUID_TEXT_FORM: &str =
    "the form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx (hexadecimal digits, no braces)";

impl Guid {
    /// The all-zero GUID, which GPT uses to mark an unused partition entry.
    pub const ZERO: Guid = Guid([0; 16]);

    /// A GUID from its 16 bytes in RFC 4122 (string) order.
    pub(crate) const fn from_rfc_bytes(bytes: [u8; 16]) -> Guid {
        Guid(bytes)
    }

    /// Parses the canonical form `c12a7328-f81f-11d2-ba4b-00a0c93ec93b`
    /// (hexadecimal digits in either case; no braces, `urn:uuid:` or hyphen-less form).
    pub fn parse(text: &str) -> Result<Guid, GptError> {
        text.parse::<uuid::fmt::Hyphenated>()
            .map(|hyphenated| Guid(hyphenated.into_uuid().into_bytes()))
            .map_err(|error| GptError::InvalidGuid {
                text: text.to_owned(),
                reason: format!("expected {GUID_TEXT_FORM}; {error}"),
            })
    }

    /// Like [`Guid::parse`] but usable in constants:
    /// `const X: Guid = Guid::parse_const("...")`. Invalid input fails the
    /// build when evaluated at compile time (and panics at run time).
    pub const fn parse_const(text: &str) -> Guid {
        // `Uuid::try_parse` also takes the braced, URN and hyphen-less forms,
        // which have other lengths; at this length it takes only the hyphenated one.
        if text.len() == uuid::fmt::Hyphenated::LENGTH {
            if let Ok(uuid) = uuid::Uuid::try_parse(text) {
                return Guid(uuid.into_bytes());
            }
        }
        panic!(
            "Guid::parse_const: invalid GUID; expected the form \
             xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx with hexadecimal digits"
        )
    }

    /// The mixed-endian form GPT stores on disk: the first three fields
    /// (4, 2 and 2 bytes) little-endian, the last 8 bytes as they are.
    pub(crate) const fn to_gpt_bytes(self) -> [u8; 16] {
        uuid::Uuid::from_bytes(self.0).to_bytes_le()
    }

    /// A GUID from the mixed-endian form GPT stores on disk.
    pub(crate) const fn from_gpt_bytes(bytes: [u8; 16]) -> Guid {
        Guid(uuid::Uuid::from_bytes_le(bytes).into_bytes())
    }

    /// Whether this is the all-zero GUID.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    /// [`Guid::derive`] of several parts, each prefixed with its length (u64,
    /// little-endian), so that no two lists of parts give the same seed.
    pub fn derive_from_parts(parts: &[&[u8]]) -> Guid {
        let mut seed = Vec::new();
        for part in parts {
            seed.extend_from_slice(&(part.len() as u64).to_le_bytes());
            seed.extend_from_slice(part);
        }
        Guid::derive(&seed)
    }

    /// A deterministic version-4-shaped GUID from arbitrary bytes: the first 16
    /// bytes of SHA-256(`seed`), with the RFC 4122 version (4) and variant bits set.
    pub fn derive(seed: &[u8]) -> Guid {
        let digest = Sha256::digest(seed);
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        Guid(
            uuid::Builder::from_random_bytes(bytes)
                .into_uuid()
                .into_bytes(),
        )
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&uuid::Uuid::from_bytes(self.0).hyphenated(), formatter)
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, formatter)
    }
}

impl FromStr for Guid {
    type Err = GptError;

    fn from_str(text: &str) -> Result<Guid, GptError> {
        Guid::parse(text)
    }
}

impl serde::Serialize for Guid {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Guid {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Guid, D::Error> {
        /// Accepts the canonical string form.
        struct GuidVisitor;

        impl serde::de::Visitor<'_> for GuidVisitor {
            type Value = Guid;

            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("a GUID string like \"c12a7328-f81f-11d2-ba4b-00a0c93ec93b\"")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Guid, E> {
                Guid::parse(text).map_err(E::custom)
            }
        }

        deserializer.deserialize_str(GuidVisitor)
    }
}

/// One entry of the partition table.
///
/// An entry whose `type_guid` is all zero is an unused slot: it is written as 128
/// zero bytes and skipped by the `find_*` functions. [`GptDisk::read`] produces such
/// slots only to keep partition numbers when a table has gaps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartitionEntry {
    /// What the partition contains (e.g. EFI System Partition, root file system).
    pub type_guid: Guid,
    /// Identifies this particular partition (shown as PARTUUID by Linux).
    pub unique_guid: Guid,
    /// First sector of the partition.
    pub first_lba: u64,
    /// Last sector of the partition (inclusive).
    pub last_lba: u64,
    /// Attribute bits, see the `ATTRIBUTE_*` constants.
    pub attributes: u64,
    /// Partition label (PARTLABEL), up to 36 UTF-16 code units.
    pub name: String,
}

impl PartitionEntry {
    /// Size of the partition in bytes.
    pub fn size_bytes(&self) -> u64 {
        (self.last_lba + 1).saturating_sub(self.first_lba) * SECTOR_SIZE
    }

    /// Byte offset of the partition from the start of the disk.
    pub fn offset_bytes(&self) -> u64 {
        self.first_lba * SECTOR_SIZE
    }

    /// Whether this is an unused slot (all-zero type GUID).
    pub fn is_unused(&self) -> bool {
        self.type_guid.is_zero()
    }
}

/// One partition the planner ([`GptDisk::plan`]) is asked to lay out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionSpec {
    /// Partition label.
    pub name: String,
    /// Partition type GUID.
    pub type_guid: Guid,
    /// Unique partition GUID.
    pub unique_guid: Guid,
    /// Requested size in bytes (rounded up to 1 MiB), or `None` to fill the rest
    /// of the disk (allowed only for the last partition).
    pub size_bytes: Option<u64>,
    /// Attribute bits, see the `ATTRIBUTE_*` constants.
    pub attributes: u64,
}

/// One of the two copies of the GPT: which one [`GptDisk::read_with_report`]
/// used, and which one [`patch_unique_guids`] names in reports and errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GptSource {
    /// The primary copy: header at LBA 1, entry array after it. When read: the
    /// primary copy was valid.
    Primary,
    /// The backup copy: header at the last LBA (or where the primary header says),
    /// entry array before it. When read: the primary copy was damaged and the
    /// backup at the last LBA was used.
    Backup,
}

impl fmt::Display for GptSource {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            GptSource::Primary => "primary",
            GptSource::Backup => "backup",
        })
    }
}

/// A whole-disk GPT: disk GUID, disk size and partition entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GptDisk {
    /// GUID identifying the disk.
    pub disk_guid: Guid,
    /// Size of the whole disk in bytes (a multiple of [`SECTOR_SIZE`]).
    pub disk_size_bytes: u64,
    /// Partition entries in table order: entry `i` is partition number `i + 1`.
    pub partitions: Vec<PartitionEntry>,
}

/// Everything that can go wrong while planning, writing or reading a GPT.
#[derive(Debug, Error)]
pub enum GptError {
    /// Reading from or writing to the disk failed.
    #[error("I/O error while {action}: {source}")]
    Io {
        /// What was being done, e.g. "reading the primary GPT header at LBA 1".
        action: String,
        /// The underlying error.
        source: io::Error,
    },
    /// The disk size is not a whole number of sectors.
    #[error(
        "disk size {disk_size_bytes} bytes is not a multiple of the {SECTOR_SIZE}-byte sector size"
    )]
    DiskSizeNotSectorMultiple {
        /// The size given.
        disk_size_bytes: u64,
    },
    /// The disk cannot hold a GPT.
    #[error(
        "disk of {disk_size_bytes} bytes is too small for a GPT: expected at least \
         {minimum_bytes} bytes (protective MBR, two headers, two entry arrays and usable space)"
    )]
    TooSmall {
        /// The size given.
        disk_size_bytes: u64,
        /// The smallest size that works.
        minimum_bytes: u64,
    },
    /// More partitions than the entry array can hold.
    #[error("{count} partitions requested, but a GPT written here holds at most {maximum}")]
    TooManyPartitions {
        /// Number of partitions (or table slots) given.
        count: usize,
        /// Maximum number of entries.
        maximum: u32,
    },
    /// The MBR boot signature is missing.
    #[error(
        "LBA 0 is not a protective MBR: expected boot signature 55 aa at byte 510, found {:02x} {:02x}",
        found[0],
        found[1]
    )]
    BadBootSignature {
        /// The two bytes found at offset 510.
        found: [u8; 2],
    },
    /// The MBR has no partition of type 0xEE.
    #[error(
        "LBA 0 is not a protective MBR: expected a partition of type 0xee, found partition types \
         {found_types:02x?}"
    )]
    NotProtectiveMbr {
        /// The types of the four MBR partition records.
        found_types: [u8; 4],
    },
    /// The sector does not start with "EFI PART".
    #[error(
        "no GPT header at LBA {lba}: expected signature \"EFI PART\", found {:?}",
        String::from_utf8_lossy(found)
    )]
    BadSignature {
        /// Where the header was expected.
        lba: u64,
        /// The first 8 bytes of that sector.
        found: [u8; 8],
    },
    /// The header revision is not 1.0.
    #[error("GPT header at LBA {lba}: expected revision 1.0 (0x00010000), found {found:#010x}")]
    UnsupportedRevision {
        /// Where the header is.
        lba: u64,
        /// The revision found.
        found: u32,
    },
    /// The header size field is out of range.
    #[error(
        "GPT header at LBA {lba}: expected a header size between {HEADER_SIZE} and \
         {SECTOR_SIZE} bytes, found {found}"
    )]
    BadHeaderSize {
        /// Where the header is.
        lba: u64,
        /// The header size found.
        found: u32,
    },
    /// The header checksum does not match its contents.
    #[error(
        "GPT header at LBA {lba} is corrupt: it records CRC32 {expected:#010x}, but its \
         contents have CRC32 {found:#010x}"
    )]
    HeaderCrc {
        /// Where the header is.
        lba: u64,
        /// The CRC recorded in the header.
        expected: u32,
        /// The CRC computed from the header contents.
        found: u32,
    },
    /// The header says it lives at a different LBA than where it was read.
    #[error("GPT header read at LBA {lba} says it belongs at LBA {found}; expected {lba}")]
    WrongHeaderLocation {
        /// Where the header was read.
        lba: u64,
        /// The location recorded in the header.
        found: u64,
    },
    /// The entry size or count is unusable.
    #[error(
        "GPT header at LBA {lba}: expected an entry size that is a power of two of at least \
         {ENTRY_SIZE} bytes and an entry array of at most {MAX_ENTRY_ARRAY_BYTES} bytes, found \
         {entry_count} entries of {entry_size} bytes"
    )]
    BadEntryLayout {
        /// Where the header is.
        lba: u64,
        /// Size of one entry found in the header.
        entry_size: u32,
        /// Number of entries found in the header.
        entry_count: u32,
    },
    /// The usable LBA range recorded in the header does not fit the disk.
    #[error(
        "GPT header at LBA {lba}: expected a usable range within LBA 2 ..= {} of this \
         {disk_sectors}-sector disk, found {first_usable_lba} ..= {last_usable_lba}",
        disk_sectors.saturating_sub(2)
    )]
    BadUsableRange {
        /// Where the header is.
        lba: u64,
        /// First usable LBA recorded in the header.
        first_usable_lba: u64,
        /// Last usable LBA recorded in the header.
        last_usable_lba: u64,
        /// Number of sectors on the disk.
        disk_sectors: u64,
    },
    /// The partition entry array lies outside the disk or inside the usable area.
    #[error(
        "GPT header at LBA {lba}: expected the partition entry array between LBA 2 and LBA {} \
         and outside the usable range {first_usable_lba} ..= {last_usable_lba}, found it at \
         LBA {entries_first_lba} ..= {entries_last_lba}",
        disk_sectors.saturating_sub(2)
    )]
    BadEntriesLocation {
        /// Where the header is.
        lba: u64,
        /// First sector of the entry array.
        entries_first_lba: u64,
        /// Last sector of the entry array.
        entries_last_lba: u64,
        /// First usable LBA recorded in the header.
        first_usable_lba: u64,
        /// Last usable LBA recorded in the header.
        last_usable_lba: u64,
        /// Number of sectors on the disk.
        disk_sectors: u64,
    },
    /// The partition entry array checksum does not match.
    #[error(
        "partition entry array at LBA {entries_lba} (of the GPT header at LBA {lba}) is corrupt: \
         the header records CRC32 {expected:#010x}, but the entries have CRC32 {found:#010x}"
    )]
    EntriesCrc {
        /// Where the header is.
        lba: u64,
        /// Where the entry array starts.
        entries_lba: u64,
        /// The CRC recorded in the header.
        expected: u32,
        /// The CRC computed from the entry array.
        found: u32,
    },
    /// A header LBA (e.g. the backup location recorded in the primary header)
    /// lies outside the disk.
    #[error(
        "expected a GPT header between LBA 1 and LBA {} of this {disk_sectors}-sector disk, \
         found a reference to LBA {lba}",
        disk_sectors.saturating_sub(1)
    )]
    HeaderOutsideDisk {
        /// The LBA where the header was to be read.
        lba: u64,
        /// Number of sectors on the disk.
        disk_sectors: u64,
    },
    /// Neither the primary nor the backup GPT could be used.
    #[error(
        "no valid GPT on the disk: the primary copy is unusable ({primary}) and the backup \
         copy is unusable ({backup})"
    )]
    NoValidHeader {
        /// Why the primary GPT (LBA 1) was rejected.
        primary: Box<GptError>,
        /// Why the backup GPT (last LBA) was rejected.
        backup: Box<GptError>,
    },
    /// A GUID string is malformed.
    #[error("invalid GUID {text:?}: {reason}")]
    InvalidGuid {
        /// The text given.
        text: String,
        /// What was expected and found.
        reason: String,
    },
    /// A GUID that must be set is all zero.
    #[error(
        "{what} is the all-zero GUID; expected a non-zero GUID (all zero marks an unused entry)"
    )]
    ZeroGuid {
        /// Which GUID, e.g. "the unique GUID of partition \"esp\"".
        what: String,
    },
    /// Two partitions share a unique GUID.
    #[error(
        "partitions {first_number} ({first_name:?}) and {second_number} ({second_name:?}) both \
         have unique GUID {guid}; expected every partition to have its own"
    )]
    DuplicateUniqueGuid {
        /// The shared GUID.
        guid: Guid,
        /// Number of the first partition.
        first_number: u32,
        /// Name of the first partition.
        first_name: String,
        /// Number of the second partition.
        second_number: u32,
        /// Name of the second partition.
        second_name: String,
    },
    /// A partition name does not fit the 36 UTF-16 code units of an entry.
    #[error(
        "partition name {name:?} is too long: expected at most {MAX_NAME_UTF16_UNITS} UTF-16 \
         code units, found {units}"
    )]
    NameTooLong {
        /// The name given.
        name: String,
        /// Its length in UTF-16 code units.
        units: usize,
    },
    /// A partition name contains a NUL character, which would end it early on disk.
    #[error("partition name {name:?} contains a NUL character; expected none")]
    NameContainsNul {
        /// The name given.
        name: String,
    },
    /// The planned partitions do not fit on the disk.
    #[error(
        "partition {partition:?} does not fit: it needs {needed_bytes} bytes (1 MiB aligned), \
         but only {available_bytes} bytes are left on the disk"
    )]
    DoesNotFit {
        /// Name of the partition.
        partition: String,
        /// Bytes it needs.
        needed_bytes: u64,
        /// Bytes available from its aligned start to the end of the usable area.
        available_bytes: u64,
    },
    /// A partition was given size zero.
    #[error(
        "partition {partition:?} has size 0; expected a positive size or None to fill the disk"
    )]
    ZeroSize {
        /// Name of the partition.
        partition: String,
    },
    /// A partition other than the last asked to fill the disk.
    #[error(
        "partition {partition:?} asks to fill the rest of the disk (size None), but it is not \
         the last partition; expected only the last partition to have no size"
    )]
    FillNotLast {
        /// Name of the partition.
        partition: String,
    },
    /// A partition ends before it starts.
    #[error(
        "partition {number} ({name:?}) ends before it starts: expected first LBA <= last LBA, \
         found {first_lba} > {last_lba}"
    )]
    BadPartitionRange {
        /// Partition number (1-based).
        number: u32,
        /// Partition name.
        name: String,
        /// First sector.
        first_lba: u64,
        /// Last sector (inclusive).
        last_lba: u64,
    },
    /// A partition lies (partly) outside the usable area.
    #[error(
        "partition {number} ({name:?}) is outside the usable area: expected it within LBA \
         {first_usable_lba} ..= {last_usable_lba}, found LBA {first_lba} ..= {last_lba}"
    )]
    PartitionOutOfRange {
        /// Partition number (1-based).
        number: u32,
        /// Partition name.
        name: String,
        /// First sector.
        first_lba: u64,
        /// Last sector (inclusive).
        last_lba: u64,
        /// First usable LBA of the disk.
        first_usable_lba: u64,
        /// Last usable LBA of the disk.
        last_usable_lba: u64,
    },
    /// A GUID change names an entry index the table does not have.
    #[error(
        "cannot change the unique GUID of entry index {entry_index}: the partition entry array \
         has {entry_count} entries; expected an index below {entry_count}"
    )]
    NoSuchEntry {
        /// The 0-based entry index given.
        entry_index: u32,
        /// Number of entries in the array.
        entry_count: u32,
    },
    /// A GUID change names an unused entry (all-zero type GUID).
    #[error(
        "cannot change the unique GUID of partition {number}: its entry is unused; expected a \
         used entry"
    )]
    UnusedEntry {
        /// The partition number (entry index + 1).
        number: u32,
    },
    /// Two GUID changes name the same entry.
    #[error("the unique GUID of partition {number} is to be changed twice; expected one change")]
    RepeatedEntry {
        /// The partition number (entry index + 1).
        number: u32,
    },
    /// A copy of the GPT can be neither patched in place nor rebuilt from the
    /// other copy, or holds something other than what the caller expected.
    #[error("cannot update the {copy} GPT: {reason}")]
    CopyUnusable {
        /// Which copy.
        copy: GptSource,
        /// Why.
        reason: String,
    },
    /// After patching, the GPT did not read back as written.
    #[error("the GPT did not read back as written: {reason}")]
    NotWritten {
        /// What differs.
        reason: String,
    },
    /// Two partitions share sectors.
    #[error(
        "partitions {first_number} ({first_name:?}, LBA {first_first_lba} ..= {first_last_lba}) \
         and {second_number} ({second_name:?}, LBA {second_first_lba} ..= {second_last_lba}) \
         overlap; expected disjoint partitions"
    )]
    Overlap {
        /// Number of the partition that starts first.
        first_number: u32,
        /// Its name.
        first_name: String,
        /// Its first sector.
        first_first_lba: u64,
        /// Its last sector.
        first_last_lba: u64,
        /// Number of the other partition.
        second_number: u32,
        /// Its name.
        second_name: String,
        /// Its first sector.
        second_first_lba: u64,
        /// Its last sector.
        second_last_lba: u64,
    },
}

impl From<io::Error> for GptError {
    fn from(source: io::Error) -> GptError {
        GptError::Io {
            action: "accessing the disk".to_owned(),
            source,
        }
    }
}

/// The fields of a GPT header that vary (everything else is fixed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    /// LBA of this header.
    my_lba: u64,
    /// LBA of the other copy of the header.
    alternate_lba: u64,
    /// First sector partitions may use.
    first_usable_lba: u64,
    /// Last sector partitions may use (inclusive).
    last_usable_lba: u64,
    /// GUID of the disk.
    disk_guid: Guid,
    /// First sector of the partition entry array this header describes.
    entries_lba: u64,
    /// Number of entries in the array.
    entry_count: u32,
    /// Size of one entry in bytes.
    entry_size: u32,
    /// CRC32 of the whole entry array.
    entries_crc: u32,
}

impl Header {
    /// The full header sector, with the header CRC filled in.
    fn encode(&self) -> [u8; SECTOR_SIZE as usize] {
        let mut sector = [0u8; SECTOR_SIZE as usize];
        sector[0..8].copy_from_slice(&HEADER_SIGNATURE);
        sector[8..12].copy_from_slice(&HEADER_REVISION_1_0.to_le_bytes());
        sector[12..16].copy_from_slice(&HEADER_SIZE.to_le_bytes());
        // Bytes 16..20 hold the header CRC (computed below), 20..24 are reserved (zero).
        put_u64(&mut sector, HEADER_MY_LBA_OFFSET, self.my_lba);
        put_u64(&mut sector, HEADER_ALTERNATE_LBA_OFFSET, self.alternate_lba);
        sector[40..48].copy_from_slice(&self.first_usable_lba.to_le_bytes());
        sector[48..56].copy_from_slice(&self.last_usable_lba.to_le_bytes());
        sector[56..72].copy_from_slice(&self.disk_guid.to_gpt_bytes());
        put_u64(&mut sector, HEADER_ENTRIES_LBA_OFFSET, self.entries_lba);
        sector[80..84].copy_from_slice(&self.entry_count.to_le_bytes());
        sector[84..88].copy_from_slice(&self.entry_size.to_le_bytes());
        put_u32(&mut sector, HEADER_ENTRIES_CRC_OFFSET, self.entries_crc);
        let crc = header_crc(&sector, HEADER_SIZE);
        put_u32(&mut sector, HEADER_CRC_OFFSET, crc);
        sector
    }

    /// Parses and checks the header sector read at `lba`: signature, revision,
    /// header size, header CRC and recorded location.
    fn decode(sector: &[u8; SECTOR_SIZE as usize], lba: u64) -> Result<Header, GptError> {
        let mut signature = [0u8; 8];
        signature.copy_from_slice(&sector[0..8]);
        if signature != HEADER_SIGNATURE {
            return Err(GptError::BadSignature {
                lba,
                found: signature,
            });
        }
        let revision = le_u32(sector, 8);
        if revision != HEADER_REVISION_1_0 {
            return Err(GptError::UnsupportedRevision {
                lba,
                found: revision,
            });
        }
        let header_size = le_u32(sector, 12);
        if !(HEADER_SIZE as u64..=SECTOR_SIZE).contains(&u64::from(header_size)) {
            return Err(GptError::BadHeaderSize {
                lba,
                found: header_size,
            });
        }
        let recorded_crc = le_u32(sector, HEADER_CRC_OFFSET);
        let computed_crc = header_crc(sector, header_size);
        if computed_crc != recorded_crc {
            return Err(GptError::HeaderCrc {
                lba,
                expected: recorded_crc,
                found: computed_crc,
            });
        }
        let my_lba = le_u64(sector, HEADER_MY_LBA_OFFSET);
        if my_lba != lba {
            return Err(GptError::WrongHeaderLocation { lba, found: my_lba });
        }
        let mut disk_guid_bytes = [0u8; 16];
        disk_guid_bytes.copy_from_slice(&sector[56..72]);
        Ok(Header {
            my_lba,
            alternate_lba: le_u64(sector, HEADER_ALTERNATE_LBA_OFFSET),
            first_usable_lba: le_u64(sector, 40),
            last_usable_lba: le_u64(sector, 48),
            disk_guid: Guid::from_gpt_bytes(disk_guid_bytes),
            entries_lba: le_u64(sector, HEADER_ENTRIES_LBA_OFFSET),
            entry_count: le_u32(sector, 80),
            entry_size: le_u32(sector, 84),
            entries_crc: le_u32(sector, HEADER_ENTRIES_CRC_OFFSET),
        })
    }
}

/// CRC32 of the first `header_size` bytes of a header sector (at most the whole
/// sector), with its CRC field taken as zero.
fn header_crc(sector: &[u8; SECTOR_SIZE as usize], header_size: u32) -> u32 {
    let end = (header_size as usize).clamp(HEADER_CRC_OFFSET + 4, sector.len());
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&sector[..HEADER_CRC_OFFSET]);
    hasher.update(&[0; 4]);
    hasher.update(&sector[HEADER_CRC_OFFSET + 4..end]);
    hasher.finalize()
}

/// Writes a little-endian `u32` at `offset`.
fn put_u32(bytes: &mut [u8], offset: usize, value: u32) {
    bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
}

/// Writes a little-endian `u64` at `offset`.
fn put_u64(bytes: &mut [u8], offset: usize, value: u64) {
    bytes[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
}

/// Reads a little-endian `u32` at `offset`.
fn le_u32(bytes: &[u8], offset: usize) -> u32 {
    let mut array = [0u8; 4];
    array.copy_from_slice(&bytes[offset..offset + 4]);
    u32::from_le_bytes(array)
}

/// Reads a little-endian `u64` at `offset`.
fn le_u64(bytes: &[u8], offset: usize) -> u64 {
    let mut array = [0u8; 8];
    array.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_le_bytes(array)
}

/// Encodes one used partition entry (128 bytes). The name must already be checked.
fn encode_entry(entry: &PartitionEntry) -> [u8; ENTRY_SIZE as usize] {
    let mut bytes = [0u8; ENTRY_SIZE as usize];
    if entry.is_unused() {
        return bytes;
    }
    bytes[0..16].copy_from_slice(&entry.type_guid.to_gpt_bytes());
    bytes[16..32].copy_from_slice(&entry.unique_guid.to_gpt_bytes());
    bytes[32..40].copy_from_slice(&entry.first_lba.to_le_bytes());
    bytes[40..48].copy_from_slice(&entry.last_lba.to_le_bytes());
    bytes[48..56].copy_from_slice(&entry.attributes.to_le_bytes());
    for (index, unit) in entry
        .name
        .encode_utf16()
        .take(MAX_NAME_UTF16_UNITS)
        .enumerate()
    {
        let offset = 56 + 2 * index;
        bytes[offset..offset + 2].copy_from_slice(&unit.to_le_bytes());
    }
    bytes
}

/// Decodes the first 128 bytes of one partition entry.
fn decode_entry(bytes: &[u8]) -> PartitionEntry {
    let mut type_bytes = [0u8; 16];
    type_bytes.copy_from_slice(&bytes[0..16]);
    let mut unique_bytes = [0u8; 16];
    unique_bytes.copy_from_slice(&bytes[16..32]);
    let name_units: Vec<u16> = (0..MAX_NAME_UTF16_UNITS)
        .map(|index| u16::from_le_bytes([bytes[56 + 2 * index], bytes[57 + 2 * index]]))
        .take_while(|&unit| unit != 0)
        .collect();
    PartitionEntry {
        type_guid: Guid::from_gpt_bytes(type_bytes),
        unique_guid: Guid::from_gpt_bytes(unique_bytes),
        first_lba: le_u64(bytes, 32),
        last_lba: le_u64(bytes, 40),
        attributes: le_u64(bytes, 48),
        // Lenient on purpose: a malformed label must not hide the partition.
        name: String::from_utf16_lossy(&name_units),
    }
}

/// Checks that `name` fits a partition entry.
fn check_name(name: &str) -> Result<(), GptError> {
    if name.contains('\0') {
        return Err(GptError::NameContainsNul {
            name: name.to_owned(),
        });
    }
    let units = name.encode_utf16().count();
    if units > MAX_NAME_UTF16_UNITS {
        return Err(GptError::NameTooLong {
            name: name.to_owned(),
            units,
        });
    }
    Ok(())
}

/// Number of sectors of a disk of `disk_size_bytes`, checking it can hold a GPT.
fn disk_sectors_of(disk_size_bytes: u64) -> Result<u64, GptError> {
    if !is_aligned(disk_size_bytes, SECTOR_SIZE) {
        return Err(GptError::DiskSizeNotSectorMultiple { disk_size_bytes });
    }
    let disk_sectors = disk_size_bytes / SECTOR_SIZE;
    if disk_sectors < MINIMUM_DISK_SECTORS {
        return Err(GptError::TooSmall {
            disk_size_bytes,
            minimum_bytes: MINIMUM_DISK_SECTORS * SECTOR_SIZE,
        });
    }
    Ok(disk_sectors)
}

/// Rounds `value` up to a multiple of `alignment`, or `None` on overflow.
fn align_up(value: u64, alignment: u64) -> Option<u64> {
    value.checked_next_multiple_of(alignment)
}

/// Rounds `value` down to a multiple of `alignment`.
fn align_down(value: u64, alignment: u64) -> u64 {
    value - value % alignment
}

/// Whether `value` is a multiple of `alignment` (`u64::is_multiple_of` needs Rust 1.87,
/// newer than the workspace's minimum).
fn is_aligned(value: u64, alignment: u64) -> bool {
    align_down(value, alignment) == value
}

/// Checks that no two used partitions share a sector.
fn check_overlaps(partitions: &[PartitionEntry]) -> Result<(), GptError> {
    let mut used: Vec<(u32, &PartitionEntry)> = partitions
        .iter()
        .enumerate()
        .filter(|(_, entry)| !entry.is_unused())
        .map(|(index, entry)| (index as u32 + 1, entry))
        .collect();
    used.sort_by_key(|(number, entry)| (entry.first_lba, *number));
    for pair in used.windows(2) {
        let (first_number, first) = pair[0];
        let (second_number, second) = pair[1];
        if second.first_lba <= first.last_lba {
            return Err(GptError::Overlap {
                first_number,
                first_name: first.name.clone(),
                first_first_lba: first.first_lba,
                first_last_lba: first.last_lba,
                second_number,
                second_name: second.name.clone(),
                second_first_lba: second.first_lba,
                second_last_lba: second.last_lba,
            });
        }
    }
    Ok(())
}

/// Checks that used partitions start before they end and lie in the usable range.
fn check_partition_ranges(
    partitions: &[PartitionEntry],
    first_usable_lba: u64,
    last_usable_lba: u64,
) -> Result<(), GptError> {
    for (index, entry) in partitions.iter().enumerate() {
        if entry.is_unused() {
            continue;
        }
        let number = index as u32 + 1;
        if entry.first_lba > entry.last_lba {
            return Err(GptError::BadPartitionRange {
                number,
                name: entry.name.clone(),
                first_lba: entry.first_lba,
                last_lba: entry.last_lba,
            });
        }
        if entry.first_lba < first_usable_lba || entry.last_lba > last_usable_lba {
            return Err(GptError::PartitionOutOfRange {
                number,
                name: entry.name.clone(),
                first_lba: entry.first_lba,
                last_lba: entry.last_lba,
                first_usable_lba,
                last_usable_lba,
            });
        }
    }
    Ok(())
}

/// The CHS (cylinder/head/sector) bytes of an MBR partition record for `lba`,
/// using the conventional 255-head, 63-sector geometry.
fn chs_bytes(lba: u64) -> [u8; 3] {
    let cylinder = lba / (CHS_HEADS_PER_CYLINDER * CHS_SECTORS_PER_TRACK);
    if cylinder > CHS_MAX_CYLINDER {
        return CHS_NOT_REPRESENTABLE;
    }
    let head = (lba / CHS_SECTORS_PER_TRACK) % CHS_HEADS_PER_CYLINDER;
    let sector = lba % CHS_SECTORS_PER_TRACK + 1;
    [
        head as u8,
        (sector as u8) | (((cylinder >> 2) & 0xC0) as u8),
        (cylinder & 0xFF) as u8,
    ]
}

/// The protective MBR for a disk of `disk_sectors` sectors: one partition of type
/// 0xEE from LBA 1 covering the disk (capped at 2^32 - 1 sectors), disk signature 0.
fn protective_mbr(disk_sectors: u64) -> [u8; SECTOR_SIZE as usize] {
    let mut sector = [0u8; SECTOR_SIZE as usize];
    let size_sectors = (disk_sectors - 1).min(u64::from(u32::MAX));
    let record = &mut sector
        [MBR_PARTITION_TABLE_OFFSET..MBR_PARTITION_TABLE_OFFSET + MBR_PARTITION_RECORD_SIZE];
    // Byte 0: boot indicator 0 (not bootable).
    record[1..4].copy_from_slice(&chs_bytes(PRIMARY_HEADER_LBA));
    record[4] = PROTECTIVE_MBR_PARTITION_TYPE;
    record[5..8].copy_from_slice(&chs_bytes(size_sectors));
    record[8..12].copy_from_slice(&(PRIMARY_HEADER_LBA as u32).to_le_bytes());
    record[12..16].copy_from_slice(&(size_sectors as u32).to_le_bytes());
    // The disk signature at MBR_DISK_SIGNATURE_OFFSET stays 0.
    debug_assert_eq!(
        sector[MBR_DISK_SIGNATURE_OFFSET..MBR_DISK_SIGNATURE_OFFSET + 4],
        [0; 4]
    );
    sector[MBR_BOOT_SIGNATURE_OFFSET..MBR_BOOT_SIGNATURE_OFFSET + 2]
        .copy_from_slice(&MBR_BOOT_SIGNATURE);
    sector
}

/// Checks that LBA 0 holds a (protective or hybrid) MBR with a 0xEE partition.
fn check_protective_mbr(sector: &[u8; SECTOR_SIZE as usize]) -> Result<(), GptError> {
    let boot_signature = [
        sector[MBR_BOOT_SIGNATURE_OFFSET],
        sector[MBR_BOOT_SIGNATURE_OFFSET + 1],
    ];
    if boot_signature != MBR_BOOT_SIGNATURE {
        return Err(GptError::BadBootSignature {
            found: boot_signature,
        });
    }
    let mut found_types = [0u8; MBR_PARTITION_RECORD_COUNT];
    for (index, found_type) in found_types.iter_mut().enumerate() {
        *found_type = sector[MBR_PARTITION_TABLE_OFFSET + index * MBR_PARTITION_RECORD_SIZE + 4];
    }
    if !found_types.contains(&PROTECTIVE_MBR_PARTITION_TYPE) {
        return Err(GptError::NotProtectiveMbr { found_types });
    }
    Ok(())
}

/// Seeks to `offset` and fills `buffer`, naming `action` in any error.
fn read_at<R: Read + Seek>(
    disk: &mut R,
    offset: u64,
    buffer: &mut [u8],
    action: impl FnOnce() -> String,
) -> Result<(), GptError> {
    disk.seek(SeekFrom::Start(offset))
        .and_then(|_| disk.read_exact(buffer))
        .map_err(|source| GptError::Io {
            action: action(),
            source,
        })
}

/// Seeks to `offset` and writes `bytes`, naming `action` in any error.
fn write_at<W: Write + Seek>(
    disk: &mut W,
    offset: u64,
    bytes: &[u8],
    action: impl FnOnce() -> String,
) -> Result<(), GptError> {
    disk.seek(SeekFrom::Start(offset))
        .and_then(|_| disk.write_all(bytes))
        .map_err(|source| GptError::Io {
            action: action(),
            source,
        })
}

/// One copy of the GPT exactly as it is on the disk: the whole header sector
/// (including any bytes beyond the defined fields) and the entry array.
#[derive(Clone, Debug, PartialEq, Eq)]
struct RawTable {
    /// The header sector.
    sector: [u8; SECTOR_SIZE as usize],
    /// Its decoded fields.
    header: Header,
    /// The header size it records: the number of bytes its CRC covers.
    header_size: u32,
    /// The partition entry array: entry count × entry size bytes, what the
    /// entry array CRC covers.
    entries: Vec<u8>,
}

/// Reads and checks one copy of the GPT as raw bytes: the header at `header_lba`
/// (signature, revision, header size, header CRC, location, usable range, entry
/// layout) and its entry array (location, CRC). The entries are not parsed.
fn read_raw_table<R: Read + Seek>(
    disk: &mut R,
    disk_sectors: u64,
    header_lba: u64,
) -> Result<RawTable, GptError> {
    if header_lba == MBR_LBA || header_lba >= disk_sectors {
        return Err(GptError::HeaderOutsideDisk {
            lba: header_lba,
            disk_sectors,
        });
    }
    let mut sector = [0u8; SECTOR_SIZE as usize];
    read_at(disk, header_lba * SECTOR_SIZE, &mut sector, || {
        format!("reading the GPT header at LBA {header_lba}")
    })?;
    let header = Header::decode(&sector, header_lba)?;

    if header.first_usable_lba < PRIMARY_ENTRIES_LBA
        || header.first_usable_lba > header.last_usable_lba
        || header.last_usable_lba >= disk_sectors - 1
    {
        return Err(GptError::BadUsableRange {
            lba: header_lba,
            first_usable_lba: header.first_usable_lba,
            last_usable_lba: header.last_usable_lba,
            disk_sectors,
        });
    }

    let entry_array_bytes = u64::from(header.entry_count) * u64::from(header.entry_size);
    if header.entry_size < ENTRY_SIZE
        || !header.entry_size.is_power_of_two()
        || entry_array_bytes > MAX_ENTRY_ARRAY_BYTES
    {
        return Err(GptError::BadEntryLayout {
            lba: header_lba,
            entry_size: header.entry_size,
            entry_count: header.entry_count,
        });
    }

    let entries_last_lba = header
        .entries_lba
        .saturating_add(entry_array_sectors(entry_array_bytes) - 1);
    let inside_disk =
        header.entries_lba >= PRIMARY_ENTRIES_LBA && entries_last_lba < disk_sectors - 1;
    let outside_usable =
        entries_last_lba < header.first_usable_lba || header.entries_lba > header.last_usable_lba;
    if !inside_disk || !outside_usable {
        return Err(GptError::BadEntriesLocation {
            lba: header_lba,
            entries_first_lba: header.entries_lba,
            entries_last_lba,
            first_usable_lba: header.first_usable_lba,
            last_usable_lba: header.last_usable_lba,
            disk_sectors,
        });
    }

    let mut entries = vec![0u8; entry_array_bytes as usize];
    read_at(disk, header.entries_lba * SECTOR_SIZE, &mut entries, || {
        format!(
            "reading the partition entry array at LBA {} of the GPT header at LBA {header_lba}",
            header.entries_lba
        )
    })?;
    let computed_crc = crc32fast::hash(&entries);
    if computed_crc != header.entries_crc {
        return Err(GptError::EntriesCrc {
            lba: header_lba,
            entries_lba: header.entries_lba,
            expected: header.entries_crc,
            found: computed_crc,
        });
    }
    Ok(RawTable {
        header_size: le_u32(&sector, 12),
        sector,
        header,
        entries,
    })
}

/// Number of sectors an entry array of `bytes` bytes occupies (at least one).
fn entry_array_sectors(bytes: u64) -> u64 {
    bytes.div_ceil(SECTOR_SIZE).max(1)
}

/// The partition entries of a raw copy up to the last used one, checked: used
/// partitions lie in the usable range and do not overlap.
fn parse_entries(table: &RawTable) -> Result<Vec<PartitionEntry>, GptError> {
    let mut partitions: Vec<PartitionEntry> = table
        .entries
        .chunks_exact(table.header.entry_size as usize)
        .map(decode_entry)
        .collect();
    while partitions.last().is_some_and(PartitionEntry::is_unused) {
        partitions.pop();
    }
    for entry in partitions.iter_mut().filter(|entry| entry.is_unused()) {
        *entry = PartitionEntry::default();
    }
    check_partition_ranges(
        &partitions,
        table.header.first_usable_lba,
        table.header.last_usable_lba,
    )?;
    check_overlaps(&partitions)?;
    Ok(partitions)
}

/// Reads and checks one copy of the GPT (header at `header_lba` and its entry
/// array), returning it as raw bytes and its partition entries up to the last
/// used one.
fn read_table<R: Read + Seek>(
    disk: &mut R,
    disk_sectors: u64,
    header_lba: u64,
) -> Result<(RawTable, Vec<PartitionEntry>), GptError> {
    let table = read_raw_table(disk, disk_sectors, header_lba)?;
    let partitions = parse_entries(&table)?;
    Ok((table, partitions))
}

/// The copy of the GPT every reader uses (see [`GptDisk::read_with_report`]).
struct ValidCopy {
    /// Which copy it is.
    source: GptSource,
    /// Its bytes.
    table: RawTable,
    /// Its partition entries up to the last used one.
    partitions: Vec<PartitionEntry>,
    /// Why the primary copy was rejected, when the backup is used.
    primary_error: Option<GptError>,
}

/// Checks the protective MBR, then reads the primary copy of the GPT, or the
/// backup at the last LBA if anything in the primary is wrong.
fn read_valid_copy<R: Read + Seek>(disk: &mut R, disk_sectors: u64) -> Result<ValidCopy, GptError> {
    let mut mbr = [0u8; SECTOR_SIZE as usize];
    read_at(disk, MBR_LBA, &mut mbr, || {
        "reading the protective MBR at LBA 0".to_owned()
    })?;
    check_protective_mbr(&mbr)?;
    match read_table(disk, disk_sectors, PRIMARY_HEADER_LBA) {
        Ok((table, partitions)) => Ok(ValidCopy {
            source: GptSource::Primary,
            table,
            partitions,
            primary_error: None,
        }),
        Err(primary_error) => match read_table(disk, disk_sectors, disk_sectors - 1) {
            Ok((table, partitions)) => Ok(ValidCopy {
                source: GptSource::Backup,
                table,
                partitions,
                primary_error: Some(primary_error),
            }),
            Err(backup_error) => Err(GptError::NoValidHeader {
                primary: Box::new(primary_error),
                backup: Box::new(backup_error),
            }),
        },
    }
}

impl GptDisk {
    /// Lays out `specs` in order, each partition starting on a 1 MiB boundary with
    /// its size rounded up to a multiple of 1 MiB. A `None` size (allowed only for
    /// the last partition) takes the rest of the usable area, rounded down to a
    /// multiple of 1 MiB.
    ///
    /// Errors name the partition: a size of 0, partitions that do not fit, a
    /// `None` size that is not last, a name that is too long, a zero or duplicate GUID.
    pub fn plan(
        disk_guid: Guid,
        disk_size_bytes: u64,
        specs: &[PartitionSpec],
    ) -> Result<GptDisk, GptError> {
        let disk_sectors = disk_sectors_of(disk_size_bytes)?;
        if specs.len() > PARTITION_ENTRY_COUNT as usize {
            return Err(GptError::TooManyPartitions {
                count: specs.len(),
                maximum: PARTITION_ENTRY_COUNT,
            });
        }
        let alignment_sectors = PARTITION_ALIGNMENT_BYTES / SECTOR_SIZE;
        let last_usable_lba = disk_sectors - RESERVED_SECTORS_AT_EACH_END;
        let mut next_free_lba = RESERVED_SECTORS_AT_EACH_END;
        let mut partitions = Vec::with_capacity(specs.len());
        for (index, spec) in specs.iter().enumerate() {
            check_name(&spec.name)?;
            if spec.type_guid.is_zero() {
                return Err(GptError::ZeroGuid {
                    what: format!("the type GUID of partition {:?}", spec.name),
                });
            }
            let start_lba = align_up(next_free_lba, alignment_sectors).unwrap_or(u64::MAX);
            let available_bytes = if start_lba > last_usable_lba {
                0
            } else {
                (last_usable_lba + 1 - start_lba) * SECTOR_SIZE
            };
            let size_bytes = match spec.size_bytes {
                Some(0) => {
                    return Err(GptError::ZeroSize {
                        partition: spec.name.clone(),
                    })
                }
                Some(requested) => {
                    align_up(requested, PARTITION_ALIGNMENT_BYTES).unwrap_or(requested)
                }
                None if index + 1 != specs.len() => {
                    return Err(GptError::FillNotLast {
                        partition: spec.name.clone(),
                    })
                }
                None => match align_down(available_bytes, PARTITION_ALIGNMENT_BYTES) {
                    0 => PARTITION_ALIGNMENT_BYTES,
                    rest => rest,
                },
            };
            if size_bytes > available_bytes || !is_aligned(size_bytes, PARTITION_ALIGNMENT_BYTES) {
                return Err(GptError::DoesNotFit {
                    partition: spec.name.clone(),
                    needed_bytes: size_bytes,
                    available_bytes,
                });
            }
            let last_lba = start_lba + size_bytes / SECTOR_SIZE - 1;
            partitions.push(PartitionEntry {
                type_guid: spec.type_guid,
                unique_guid: spec.unique_guid,
                first_lba: start_lba,
                last_lba,
                attributes: spec.attributes,
                name: spec.name.clone(),
            });
            next_free_lba = last_lba + 1;
        }
        let disk = GptDisk {
            disk_guid,
            disk_size_bytes,
            partitions,
        };
        disk.validate()?;
        Ok(disk)
    }

    /// First sector partitions may use: 34 (after the MBR, the primary header and
    /// the 32-sector primary entry array).
    pub fn first_usable_lba(&self) -> u64 {
        RESERVED_SECTORS_AT_EACH_END
    }

    /// Last sector partitions may use (inclusive): number of disk sectors - 34
    /// (before the 32-sector backup entry array and the backup header).
    pub fn last_usable_lba(&self) -> u64 {
        (self.disk_size_bytes / SECTOR_SIZE).saturating_sub(RESERVED_SECTORS_AT_EACH_END)
    }

    /// Checks that this table can be written: disk size, partition count, names,
    /// non-zero and distinct GUIDs, partitions inside the usable area, no overlaps.
    /// Unused slots (zero type GUID) are ignored.
    pub fn validate(&self) -> Result<(), GptError> {
        disk_sectors_of(self.disk_size_bytes)?;
        if self.partitions.len() > PARTITION_ENTRY_COUNT as usize {
            return Err(GptError::TooManyPartitions {
                count: self.partitions.len(),
                maximum: PARTITION_ENTRY_COUNT,
            });
        }
        if self.disk_guid.is_zero() {
            return Err(GptError::ZeroGuid {
                what: "the disk GUID".to_owned(),
            });
        }
        let used: Vec<(u32, &PartitionEntry)> = self.used_partitions().collect();
        for (_, entry) in &used {
            check_name(&entry.name)?;
            if entry.unique_guid.is_zero() {
                return Err(GptError::ZeroGuid {
                    what: format!("the unique GUID of partition {:?}", entry.name),
                });
            }
        }
        for (position, (first_number, first)) in used.iter().enumerate() {
            for (second_number, second) in &used[position + 1..] {
                if first.unique_guid == second.unique_guid {
                    return Err(GptError::DuplicateUniqueGuid {
                        guid: first.unique_guid,
                        first_number: *first_number,
                        first_name: first.name.clone(),
                        second_number: *second_number,
                        second_name: second.name.clone(),
                    });
                }
            }
        }
        check_partition_ranges(
            &self.partitions,
            self.first_usable_lba(),
            self.last_usable_lba(),
        )?;
        check_overlaps(&self.partitions)
    }

    /// Writes the protective MBR (LBA 0), the primary entry array (LBA 2..=33) and
    /// header (LBA 1), then the backup entry array (LBA N-33..=N-2) and header
    /// (LBA N-1), in that order, so an interrupted write leaves at least one
    /// consistent copy. Partition contents are not touched. The disk (file) must
    /// already be `disk_size_bytes` long, or it is extended by the write of the
    /// backup header.
    pub fn write<W: Write + Seek>(&self, disk: &mut W) -> Result<(), GptError> {
        self.validate()?;
        let disk_sectors = self.disk_size_bytes / SECTOR_SIZE;

        let mut entries = vec![0u8; (PARTITION_ENTRY_COUNT * ENTRY_SIZE) as usize];
        for (entry, slot) in self
            .partitions
            .iter()
            .zip(entries.chunks_exact_mut(ENTRY_SIZE as usize))
        {
            slot.copy_from_slice(&encode_entry(entry));
        }
        let entries_crc = crc32fast::hash(&entries);

        let backup_header_lba = disk_sectors - 1;
        let backup_entries_lba = backup_header_lba - ENTRY_ARRAY_SECTORS;
        let primary = Header {
            my_lba: PRIMARY_HEADER_LBA,
            alternate_lba: backup_header_lba,
            first_usable_lba: self.first_usable_lba(),
            last_usable_lba: self.last_usable_lba(),
            disk_guid: self.disk_guid,
            entries_lba: PRIMARY_ENTRIES_LBA,
            entry_count: PARTITION_ENTRY_COUNT,
            entry_size: ENTRY_SIZE,
            entries_crc,
        };
        let backup = Header {
            my_lba: backup_header_lba,
            alternate_lba: PRIMARY_HEADER_LBA,
            entries_lba: backup_entries_lba,
            ..primary
        };

        write_at(disk, MBR_LBA, &protective_mbr(disk_sectors), || {
            "writing the protective MBR at LBA 0".to_owned()
        })?;
        write_at(disk, PRIMARY_ENTRIES_LBA * SECTOR_SIZE, &entries, || {
            format!("writing the primary partition entry array at LBA {PRIMARY_ENTRIES_LBA}")
        })?;
        write_at(
            disk,
            PRIMARY_HEADER_LBA * SECTOR_SIZE,
            &primary.encode(),
            || format!("writing the primary GPT header at LBA {PRIMARY_HEADER_LBA}"),
        )?;
        write_at(disk, backup_entries_lba * SECTOR_SIZE, &entries, || {
            format!("writing the backup partition entry array at LBA {backup_entries_lba}")
        })?;
        write_at(
            disk,
            backup_header_lba * SECTOR_SIZE,
            &backup.encode(),
            || format!("writing the backup GPT header at LBA {backup_header_lba}"),
        )?;
        disk.flush().map_err(|source| GptError::Io {
            action: "flushing the partition table to the disk".to_owned(),
            source,
        })
    }

    /// Reads and validates the GPT of a disk of `disk_size_bytes`; see
    /// [`GptDisk::read_with_report`].
    pub fn read<R: Read + Seek>(disk: &mut R, disk_size_bytes: u64) -> Result<GptDisk, GptError> {
        Self::read_with_report(disk, disk_size_bytes).map(|(gpt, _)| gpt)
    }

    /// Reads and validates the GPT of a disk of `disk_size_bytes` and says which
    /// copy was used.
    ///
    /// Checks the protective MBR, then the primary header (signature, revision,
    /// header size, header CRC, location, usable range, entry layout) and its entry
    /// array (CRC, partitions inside the usable range, no overlaps). If anything in
    /// the primary copy is wrong, the backup header at the last LBA is tried.
    ///
    /// The returned `disk_size_bytes` is the caller's. A valid primary whose backup
    /// is not at the end of the disk (an image written to a larger disk) is
    /// accepted; writing the result back moves the backup to the real end.
    /// Trailing unused entries are dropped; unused entries between used ones are
    /// kept as [`PartitionEntry::default`] so partition numbers are preserved.
    pub fn read_with_report<R: Read + Seek>(
        disk: &mut R,
        disk_size_bytes: u64,
    ) -> Result<(GptDisk, GptSource), GptError> {
        let disk_sectors = disk_sectors_of(disk_size_bytes)?;
        let valid = read_valid_copy(disk, disk_sectors)?;
        Ok((
            GptDisk {
                disk_guid: valid.table.header.disk_guid,
                disk_size_bytes,
                partitions: valid.partitions,
            },
            valid.source,
        ))
    }

    /// The partition with this unique GUID, with its 1-based partition number.
    pub fn find_by_unique_guid(&self, guid: &Guid) -> Option<(u32, &PartitionEntry)> {
        self.used_partitions()
            .find(|(_, entry)| entry.unique_guid == *guid)
    }

    /// The first partition with this name, with its 1-based partition number.
    pub fn find_by_name(&self, name: &str) -> Option<(u32, &PartitionEntry)> {
        self.used_partitions().find(|(_, entry)| entry.name == name)
    }

    /// Used partitions with their 1-based partition numbers.
    fn used_partitions(&self) -> impl Iterator<Item = (u32, &PartitionEntry)> {
        self.partitions
            .iter()
            .enumerate()
            .filter(|(_, entry)| !entry.is_unused())
            .map(|(index, entry)| (index as u32 + 1, entry))
    }
}

/// One unique GUID change for [`patch_unique_guids`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UniqueGuidChange {
    /// 0-based index of the entry in the partition entry array (partition number - 1).
    pub entry_index: u32,
    /// The unique GUID the caller read for this entry. The patch is refused
    /// ([`GptError::CopyUnusable`]) if the entry holds neither this nor
    /// [`UniqueGuidChange::new`] (which it holds when the same change is retried
    /// after an interruption), i.e. the table changed since the caller read it.
    pub expected: Guid,
    /// The unique GUID to give the entry.
    pub new: Guid,
}

/// What [`patch_unique_guids`] found and did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PatchReport {
    /// The copy that was valid on entry and served as the source of truth (the
    /// copy every reader uses: the primary unless it was damaged).
    pub source: GptSource,
    /// The other copy, if it was unusable and rebuilt from the source, with why
    /// it was unusable.
    pub rebuilt: Option<(GptSource, String)>,
    /// Whether both copies were usable but their entry arrays differed beyond
    /// the GUID fields being changed; the backup was made equal to the primary.
    pub copies_differed: bool,
    /// The copies written, in the order written (each synced before the next).
    /// Empty when the disk already held the requested GUIDs in both copies.
    pub written: Vec<GptSource>,
    /// The table as read on entry.
    pub before: GptDisk,
    /// The table as read back afterwards (from the primary copy).
    pub after: GptDisk,
}

/// Changes the unique GUIDs of some partition entries in both copies of the GPT
/// of `disk` (`disk_size_bytes` long), crash-safely, and returns what was done.
///
/// Only the 16-byte unique GUID fields of the given entries change, plus each
/// copy's entry array CRC and header CRC; every other byte of the entry arrays,
/// the headers and the protective MBR stays as it is. Refused before anything is
/// written: an index outside the entry array ([`GptError::NoSuchEntry`]), an
/// unused entry ([`GptError::UnusedEntry`]), an entry named twice
/// ([`GptError::RepeatedEntry`]), an entry that holds neither
/// [`UniqueGuidChange::expected`] nor the new GUID ([`GptError::CopyUnusable`]),
/// a zero new GUID ([`GptError::ZeroGuid`]), and a new GUID another used entry
/// has or keeps, or that two changes share ([`GptError::DuplicateUniqueGuid`]).
///
/// # Crash safety
///
/// Every GPT reader (the kernel, [`GptDisk::read`]) uses the primary copy if its
/// header and entry CRCs are valid and falls back to the backup copy otherwise.
/// So the copies are written one after the other, `sync` called after each:
///
/// 1. the backup entry array, then the backup header; flush and `sync`;
/// 2. the primary entry array, then the primary header; flush and `sync`.
///
/// Interrupted in step 1, the untouched primary still describes the old state.
/// Interrupted in step 2, the primary's CRCs no longer match and readers use the
/// complete, synced backup, the new state. Either way a reader sees the old or
/// the new GUIDs, never a mix. (This assumes the disk does not reorder writes
/// across a sync and does not corrupt sectors it was not writing; nothing can do
/// better with two copies.)
///
/// The copy readers use (see [`PatchReport::source`]) is the source of truth. The
/// other copy is patched in place if it is valid and has the same entry layout;
/// otherwise it is rebuilt from the source at the standard location (the primary
/// at LBA 1 with its entries at LBA 2; the backup at the LBA the primary header
/// names, its entries just before it). So running this again after an
/// interruption repairs the damaged copy and completes the change. If both copies
/// are valid but their entry arrays differ elsewhere, the backup is made equal to
/// the primary. A copy that already holds exactly the result is not written, so
/// asking for the GUIDs the disk already has writes nothing.
///
/// Afterwards both copies are read back and checked to hold the patched entry
/// array, and the primary to be the copy readers use with exactly the expected
/// entries ([`GptError::NotWritten`] otherwise).
pub fn patch_unique_guids<D, S>(
    disk: &mut D,
    disk_size_bytes: u64,
    changes: &[UniqueGuidChange],
    mut sync: S,
) -> Result<PatchReport, GptError>
where
    D: Read + Write + Seek,
    S: FnMut(&mut D) -> io::Result<()>,
{
    let disk_sectors = disk_sectors_of(disk_size_bytes)?;
    let valid = read_valid_copy(disk, disk_sectors)?;
    check_guid_changes(&valid, changes)?;
    let source = valid.source;
    let entry_size = valid.table.header.entry_size as usize;
    let mut entries = valid.table.entries.clone();
    for change in changes {
        let offset = change.entry_index as usize * entry_size + ENTRY_UNIQUE_GUID_OFFSET;
        entries[offset..offset + 16].copy_from_slice(&change.new.to_gpt_bytes());
    }
    let before = GptDisk {
        disk_guid: valid.table.header.disk_guid,
        disk_size_bytes,
        partitions: valid.partitions,
    };

    // `*_on_disk`: whether the copy is what the disk holds (else it is rebuilt,
    // and written even if the entries do not change).
    let truth = valid.table;
    let (primary, primary_on_disk, backup, backup_on_disk, rebuilt) = match source {
        GptSource::Primary => {
            let backup_lba = truth.header.alternate_lba;
            match read_backup_of(disk, disk_sectors, &truth) {
                Ok(backup) => (truth, true, backup, true, None),
                Err(why) => {
                    let reason = format!("the backup at LBA {backup_lba} is unusable: {why}");
                    let backup = truth.mirror_as_backup(disk_sectors).map_err(|why_not| {
                        GptError::CopyUnusable {
                            copy: GptSource::Backup,
                            reason: format!("{reason}, and it cannot be rebuilt: {why_not}"),
                        }
                    })?;
                    let rebuilt = Some((GptSource::Backup, reason));
                    (truth, true, backup, false, rebuilt)
                }
            }
        }
        GptSource::Backup => {
            let why = valid
                .primary_error
                .map_or_else(String::new, |error| error.to_string());
            let reason = format!("the primary is unusable: {why}");
            let primary = truth
                .mirror_as_primary()
                .map_err(|why_not| GptError::CopyUnusable {
                    copy: GptSource::Primary,
                    reason: format!("{reason}, and it cannot be rebuilt: {why_not}"),
                })?;
            let rebuilt = Some((GptSource::Primary, reason));
            (primary, false, truth, true, rebuilt)
        }
    };
    let copies_differed = primary_on_disk
        && backup_on_disk
        && !equal_outside_unique_guids(&primary.entries, &backup.entries, entry_size, changes);

    let mut written = Vec::new();
    for (copy, table, on_disk) in [
        (GptSource::Backup, &backup, backup_on_disk),
        (GptSource::Primary, &primary, primary_on_disk),
    ] {
        let new = table.with_entries(&entries);
        if on_disk && new == *table {
            continue;
        }
        new.write(disk, copy)?;
        disk.flush()
            .and_then(|()| sync(disk))
            .map_err(|source| GptError::Io {
                action: format!("syncing the {copy} GPT to the disk"),
                source,
            })?;
        written.push(copy);
    }

    let after = confirm_patched(disk, disk_sectors, &before, changes, &entries)?;
    Ok(PatchReport {
        source,
        rebuilt,
        copies_differed,
        written,
        before,
        after,
    })
}

/// Checks the requested changes against the copy readers use; see
/// [`patch_unique_guids`] for the rules.
fn check_guid_changes(valid: &ValidCopy, changes: &[UniqueGuidChange]) -> Result<(), GptError> {
    let entry_count = valid.table.header.entry_count;
    let used_entry = |entry_index: u32| -> Result<&PartitionEntry, GptError> {
        if entry_index >= entry_count {
            return Err(GptError::NoSuchEntry {
                entry_index,
                entry_count,
            });
        }
        valid
            .partitions
            .get(entry_index as usize)
            .filter(|entry| !entry.is_unused())
            .ok_or(GptError::UnusedEntry {
                number: entry_index + 1,
            })
    };
    for (position, change) in changes.iter().enumerate() {
        let entry = used_entry(change.entry_index)?;
        let number = change.entry_index + 1;
        if changes[..position]
            .iter()
            .any(|earlier| earlier.entry_index == change.entry_index)
        {
            return Err(GptError::RepeatedEntry { number });
        }
        if entry.unique_guid != change.expected && entry.unique_guid != change.new {
            return Err(GptError::CopyUnusable {
                copy: valid.source,
                reason: format!(
                    "entry {number} ({:?}) holds unique GUID {}; expected {} (the GUID read \
                     for it before) or {} (the new one); did the table change?",
                    entry.name, entry.unique_guid, change.expected, change.new
                ),
            });
        }
        if change.new.is_zero() {
            return Err(GptError::ZeroGuid {
                what: format!(
                    "the new unique GUID of partition {number} ({:?})",
                    entry.name
                ),
            });
        }
    }
    // Unique GUIDs after the change: the new ones for changed entries, the old
    // ones for all other used entries.
    let new_guid_of = |index: usize, entry: &PartitionEntry| {
        changes
            .iter()
            .find(|change| change.entry_index as usize == index)
            .map_or(entry.unique_guid, |change| change.new)
    };
    let used: Vec<(u32, &PartitionEntry, Guid)> = valid
        .partitions
        .iter()
        .enumerate()
        .filter(|(_, entry)| !entry.is_unused())
        .map(|(index, entry)| (index as u32 + 1, entry, new_guid_of(index, entry)))
        .collect();
    for change in changes {
        let number = change.entry_index + 1;
        if let Some((other_number, other, _)) = used
            .iter()
            .find(|(other_number, _, guid)| *other_number != number && *guid == change.new)
        {
            let entry = &valid.partitions[change.entry_index as usize];
            let ((first_number, first), (second_number, second)) = if *other_number < number {
                ((*other_number, *other), (number, entry))
            } else {
                ((number, entry), (*other_number, *other))
            };
            return Err(GptError::DuplicateUniqueGuid {
                guid: change.new,
                first_number,
                first_name: first.name.clone(),
                second_number,
                second_name: second.name.clone(),
            });
        }
    }
    Ok(())
}

/// Reads and checks the backup copy the (valid) `primary` names, and checks it
/// can be patched in place: it lies after the usable area and has the primary's
/// entry layout. `Err` says why not.
fn read_backup_of<R: Read + Seek>(
    disk: &mut R,
    disk_sectors: u64,
    primary: &RawTable,
) -> Result<RawTable, String> {
    let backup_lba = primary.header.alternate_lba;
    if backup_lba <= primary.header.last_usable_lba {
        return Err(format!(
            "the primary header puts it at LBA {backup_lba}, not after the usable area \
             (ending at LBA {})",
            primary.header.last_usable_lba
        ));
    }
    let backup =
        read_raw_table(disk, disk_sectors, backup_lba).map_err(|error| error.to_string())?;
    if !same_entry_layout(&backup, primary) {
        return Err(format!(
            "its entry array ({} entries of {} bytes) differs in layout from the primary's \
             ({} entries of {} bytes)",
            backup.header.entry_count,
            backup.header.entry_size,
            primary.header.entry_count,
            primary.header.entry_size
        ));
    }
    Ok(backup)
}

/// Whether two copies have the same entry count and entry size.
fn same_entry_layout(first: &RawTable, second: &RawTable) -> bool {
    first.header.entry_count == second.header.entry_count
        && first.header.entry_size == second.header.entry_size
}

/// Whether two entry arrays of the same layout are equal apart from the unique
/// GUID fields of the changed entries (after an interrupted patch, those differ).
fn equal_outside_unique_guids(
    first: &[u8],
    second: &[u8],
    entry_size: usize,
    changes: &[UniqueGuidChange],
) -> bool {
    let mut first = first.to_vec();
    let mut second = second.to_vec();
    for change in changes {
        let offset = change.entry_index as usize * entry_size + ENTRY_UNIQUE_GUID_OFFSET;
        first[offset..offset + 16].fill(0);
        second[offset..offset + 16].fill(0);
    }
    first == second
}

/// Re-reads both copies and the table readers use, checking they hold exactly
/// what was written; returns the table read back.
fn confirm_patched<D: Read + Seek>(
    disk: &mut D,
    disk_sectors: u64,
    before: &GptDisk,
    changes: &[UniqueGuidChange],
    entries: &[u8],
) -> Result<GptDisk, GptError> {
    let not_written = |reason: String| GptError::NotWritten { reason };
    let primary = read_raw_table(disk, disk_sectors, PRIMARY_HEADER_LBA)
        .map_err(|error| not_written(format!("primary copy: {error}")))?;
    let backup = read_raw_table(disk, disk_sectors, primary.header.alternate_lba)
        .map_err(|error| not_written(format!("backup copy: {error}")))?;
    for (copy, table) in [(GptSource::Primary, &primary), (GptSource::Backup, &backup)] {
        if table.entries != entries {
            return Err(not_written(format!(
                "the {copy} entry array differs from what was written"
            )));
        }
    }
    let valid = read_valid_copy(disk, disk_sectors)?;
    if valid.source != GptSource::Primary {
        return Err(not_written("the primary copy is not used".to_owned()));
    }
    let mut expected = before.partitions.clone();
    for change in changes {
        expected[change.entry_index as usize].unique_guid = change.new;
    }
    if valid.partitions != expected {
        return Err(not_written(
            "the partition entries differ from the expected ones".to_owned(),
        ));
    }
    Ok(GptDisk {
        disk_guid: valid.table.header.disk_guid,
        disk_size_bytes: before.disk_size_bytes,
        partitions: valid.partitions,
    })
}

impl RawTable {
    /// Number of sectors of the entry array.
    fn entries_sectors(&self) -> u64 {
        entry_array_sectors(self.entries.len() as u64)
    }

    /// This copy moved to another location (its own header LBA, the other
    /// header's LBA, its entry array LBA), CRCs recomputed. Every other header
    /// byte stays as it is.
    fn relocated(&self, header_lba: u64, alternate_lba: u64, entries_lba: u64) -> RawTable {
        let mut table = self.clone();
        table.header.my_lba = header_lba;
        table.header.alternate_lba = alternate_lba;
        table.header.entries_lba = entries_lba;
        put_u64(&mut table.sector, HEADER_MY_LBA_OFFSET, header_lba);
        put_u64(
            &mut table.sector,
            HEADER_ALTERNATE_LBA_OFFSET,
            alternate_lba,
        );
        put_u64(&mut table.sector, HEADER_ENTRIES_LBA_OFFSET, entries_lba);
        table.seal();
        table
    }

    /// A backup copy rebuilt from this primary, at the LBA the primary names,
    /// with its entry array just before it.
    fn mirror_as_backup(&self, disk_sectors: u64) -> Result<RawTable, String> {
        let backup_lba = self.header.alternate_lba;
        let entries_lba = backup_lba.saturating_sub(self.entries_sectors());
        if backup_lba >= disk_sectors || entries_lba <= self.header.last_usable_lba {
            return Err(format!(
                "the primary header puts the backup at LBA {backup_lba}, which does not fit \
                 between the usable area (ending at LBA {}) and the end of the disk \
                 ({disk_sectors} sectors)",
                self.header.last_usable_lba
            ));
        }
        Ok(self.relocated(backup_lba, self.header.my_lba, entries_lba))
    }

    /// A primary copy rebuilt from this backup, at LBA 1 with its entry array at LBA 2.
    fn mirror_as_primary(&self) -> Result<RawTable, String> {
        if PRIMARY_ENTRIES_LBA + self.entries_sectors() > self.header.first_usable_lba {
            return Err(format!(
                "the entry array ({} sectors) does not fit between LBA {PRIMARY_ENTRIES_LBA} and \
                 the first usable LBA {}",
                self.entries_sectors(),
                self.header.first_usable_lba
            ));
        }
        Ok(self.relocated(PRIMARY_HEADER_LBA, self.header.my_lba, PRIMARY_ENTRIES_LBA))
    }

    /// This copy with another entry array of the same size, CRCs recomputed.
    fn with_entries(&self, entries: &[u8]) -> RawTable {
        let mut table = self.clone();
        table.entries.copy_from_slice(entries);
        table.seal();
        table
    }

    /// Recomputes the entry array CRC, then the header CRC.
    fn seal(&mut self) {
        self.header.entries_crc = crc32fast::hash(&self.entries);
        put_u32(
            &mut self.sector,
            HEADER_ENTRIES_CRC_OFFSET,
            self.header.entries_crc,
        );
        let crc = header_crc(&self.sector, self.header_size);
        put_u32(&mut self.sector, HEADER_CRC_OFFSET, crc);
    }

    /// Writes the entry array, then the header (neither flushed nor synced).
    fn write<W: Write + Seek>(&self, disk: &mut W, copy: GptSource) -> Result<(), GptError> {
        let entries_lba = self.header.entries_lba;
        write_at(disk, entries_lba * SECTOR_SIZE, &self.entries, || {
            format!("writing the {copy} partition entry array at LBA {entries_lba}")
        })?;
        let header_lba = self.header.my_lba;
        write_at(disk, header_lba * SECTOR_SIZE, &self.sector, || {
            format!("writing the {copy} GPT header at LBA {header_lba}")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    const MIB: u64 = 1024 * 1024;
    const ESP_TYPE: Guid = Guid::parse_const("c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
    const LINUX_DATA_TYPE: Guid = Guid::parse_const("0fc63daf-8483-4772-8e79-3d69d8477de4");
    const DISK_GUID: Guid = Guid::parse_const("11111111-2222-4333-8444-555555555555");

    fn spec(name: &str, size_bytes: Option<u64>) -> PartitionSpec {
        PartitionSpec {
            name: name.to_owned(),
            type_guid: if name == "esp" {
                ESP_TYPE
            } else {
                LINUX_DATA_TYPE
            },
            unique_guid: Guid::derive(name.as_bytes()),
            size_bytes,
            attributes: 0,
        }
    }

    fn sample_disk(disk_size_bytes: u64) -> GptDisk {
        let mut specs = vec![
            spec("esp", Some(2 * MIB)),
            spec("root-a", Some(3 * MIB + 1)),
            spec("data", None),
        ];
        specs[1].attributes = ATTRIBUTE_READ_ONLY | ATTRIBUTE_REQUIRED;
        specs[2].attributes = ATTRIBUTE_GROWFS;
        GptDisk::plan(DISK_GUID, disk_size_bytes, &specs).expect("plan sample disk")
    }

    fn written_image(gpt: &GptDisk) -> Vec<u8> {
        let mut image = Cursor::new(vec![0u8; gpt.disk_size_bytes as usize]);
        gpt.write(&mut image).expect("write GPT");
        image.into_inner()
    }

    #[test]
    fn guid_parse_format_round_trip() {
        let text = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";
        let guid = Guid::parse(text).unwrap();
        assert_eq!(guid, ESP_TYPE);
        assert_eq!(guid.to_string(), text);
        assert_eq!(format!("{guid:?}"), text);
        assert_eq!(Guid::parse(&text.to_uppercase()).unwrap(), guid);
        assert_eq!(text.parse::<Guid>().unwrap(), guid);
        assert_eq!(
            guid.0,
            [
                0xc1, 0x2a, 0x73, 0x28, 0xf8, 0x1f, 0x11, 0xd2, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e,
                0xc9, 0x3b
            ]
        );
    }

    #[test]
    fn guid_mixed_endian_round_trip() {
        // The EFI System Partition type GUID as GPT stores it (UEFI specification,
        // and what sgdisk writes for type ef00): the first three fields reversed.
        let on_disk = [
            0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e,
            0xc9, 0x3b,
        ];
        assert_eq!(ESP_TYPE.to_gpt_bytes(), on_disk);
        assert_eq!(Guid::from_gpt_bytes(on_disk), ESP_TYPE);
        let text = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";
        assert_eq!(Guid::parse(text).unwrap().to_gpt_bytes(), on_disk);
        assert_eq!(Guid::from_gpt_bytes(on_disk).to_string(), text);
        let other = Guid::derive(b"anything");
        assert_eq!(Guid::from_gpt_bytes(other.to_gpt_bytes()), other);
    }

    #[test]
    fn guid_rejects_malformed_text() {
        for bad in [
            "",
            "c12a7328-f81f-11d2-ba4b-00a0c93ec93",
            "c12a7328-f81f-11d2-ba4b-00a0c93ec93bb",
            "c12a7328f-81f-11d2-ba4b-00a0c93ec93b",
            "c12a7328-f81f-11d2-ba4b-00a0c93ec93g",
            "{c12a7328-f81f-11d2-ba4b-00a0c93ec9}",
            "c12a7328-f81f-11d2-ba4b-00a0c93ec9é",
            // Forms other parsers (uuid's `Uuid::parse_str`) accept: refused here.
            "{c12a7328-f81f-11d2-ba4b-00a0c93ec93b}",
            "urn:uuid:c12a7328-f81f-11d2-ba4b-00a0c93ec93b",
            "c12a7328f81f11d2ba4b00a0c93ec93b",
        ] {
            let error = Guid::parse(bad).unwrap_err();
            assert!(
                matches!(&error, GptError::InvalidGuid { text, .. } if text == bad),
                "{bad:?} gave {error}"
            );
            let message = error.to_string();
            assert!(message.contains("expected"), "{message}");
            assert!(message.contains("found"), "{message}");
        }
        let message = Guid::parse("c12a7328-f81f-11d2-ba4b-00a0c93ec93g")
            .unwrap_err()
            .to_string();
        // uuid's parser counts positions from 0.
        assert!(message.contains("found `g` at 35"), "{message}");
    }

    #[test]
    fn guid_parse_const_takes_only_the_hyphenated_form() {
        assert_eq!(
            Guid::parse_const("C12A7328-F81F-11D2-BA4B-00A0C93EC93B"),
            ESP_TYPE
        );
        for other_form in [
            "{c12a7328-f81f-11d2-ba4b-00a0c93ec93b}",
            "urn:uuid:c12a7328-f81f-11d2-ba4b-00a0c93ec93b",
            "c12a7328f81f11d2ba4b00a0c93ec93b",
        ] {
            let parsed =
                std::panic::catch_unwind(|| Guid::parse_const(std::hint::black_box(other_form)));
            assert!(parsed.is_err(), "{other_form:?} was accepted");
        }
    }

    #[test]
    #[should_panic(expected = "invalid GUID")]
    fn guid_parse_const_panics_on_bad_input() {
        let _ = Guid::parse_const(std::hint::black_box("not-a-guid"));
    }

    #[test]
    fn guid_serde_uses_string_form() {
        let json = serde_json::to_string(&ESP_TYPE).unwrap();
        assert_eq!(json, "\"c12a7328-f81f-11d2-ba4b-00a0c93ec93b\"");
        let back: Guid = serde_json::from_str(&json).unwrap();
        assert_eq!(back, ESP_TYPE);
        let error = serde_json::from_str::<Guid>("\"nope\"").unwrap_err();
        assert!(error.to_string().contains("invalid GUID"), "{error}");
        assert!(serde_json::from_str::<Guid>("42").is_err());
    }

    #[test]
    fn guid_derive_is_deterministic_version_4() {
        let first = Guid::derive(b"seed");
        assert_eq!(first, Guid::derive(b"seed"));
        assert_ne!(first, Guid::derive(b"other seed"));
        assert_eq!(first.0[6] >> 4, 4, "version nibble");
        assert_eq!(first.0[8] & 0xC0, 0x80, "RFC 4122 variant");
        let digest = Sha256::digest(b"seed");
        assert_eq!(first.0[..6], digest[..6]);
        assert_eq!(first.0[9..], digest[9..16]);
        assert!(!first.is_zero());
        assert!(Guid::default().is_zero());
    }

    #[test]
    fn plan_aligns_to_one_mebibyte() {
        let disk_size_bytes = 16 * MIB;
        let gpt = sample_disk(disk_size_bytes);
        assert_eq!(gpt.first_usable_lba(), 34);
        assert_eq!(gpt.last_usable_lba(), disk_size_bytes / SECTOR_SIZE - 34);
        let [esp, root, data] = &gpt.partitions[..] else {
            panic!("expected three partitions, found {:?}", gpt.partitions);
        };
        assert_eq!(esp.offset_bytes(), MIB);
        assert_eq!(esp.size_bytes(), 2 * MIB);
        assert_eq!(root.offset_bytes(), 3 * MIB);
        assert_eq!(
            root.size_bytes(),
            4 * MIB,
            "3 MiB + 1 byte rounds up to 4 MiB"
        );
        assert_eq!(root.attributes, ATTRIBUTE_READ_ONLY | ATTRIBUTE_REQUIRED);
        assert_eq!(data.offset_bytes(), 7 * MIB);
        // 16 MiB disk minus 1 MiB start, minus the 17 KiB backup GPT: the fill
        // partition gets the whole MiBs left, 8 MiB.
        assert_eq!(data.size_bytes(), 8 * MIB);
        assert!(data.last_lba <= gpt.last_usable_lba());
        for entry in &gpt.partitions {
            assert_eq!(entry.offset_bytes() % MIB, 0);
            assert_eq!(entry.size_bytes() % MIB, 0);
        }
    }

    #[test]
    fn plan_reports_errors_naming_the_partition() {
        let disk_size_bytes = 16 * MIB;
        let error = GptDisk::plan(DISK_GUID, disk_size_bytes, &[spec("esp", Some(0))]).unwrap_err();
        assert!(matches!(&error, GptError::ZeroSize { partition } if partition == "esp"));

        let error = GptDisk::plan(
            DISK_GUID,
            disk_size_bytes,
            &[spec("data", None), spec("esp", Some(MIB))],
        )
        .unwrap_err();
        assert!(matches!(&error, GptError::FillNotLast { partition } if partition == "data"));

        let error = GptDisk::plan(
            DISK_GUID,
            disk_size_bytes,
            &[spec("esp", Some(10 * MIB)), spec("root-a", Some(5 * MIB))],
        )
        .unwrap_err();
        match &error {
            GptError::DoesNotFit {
                partition,
                needed_bytes,
                available_bytes,
            } => {
                assert_eq!(partition, "root-a");
                assert_eq!(*needed_bytes, 5 * MIB);
                assert_eq!(*available_bytes, 16 * MIB - 11 * MIB - 33 * SECTOR_SIZE);
            }
            other => panic!("expected DoesNotFit, found {other}"),
        }
        let message = error.to_string();
        assert!(
            message.contains("\"root-a\"") && message.contains("5242880"),
            "{message}"
        );

        let error = GptDisk::plan(
            DISK_GUID,
            disk_size_bytes,
            &[spec("esp", Some(14 * MIB)), spec("data", None)],
        )
        .unwrap_err();
        assert!(matches!(&error, GptError::DoesNotFit { partition, .. } if partition == "data"));

        let error = GptDisk::plan(DISK_GUID, 4096, &[]).unwrap_err();
        assert!(matches!(
            error,
            GptError::TooSmall {
                disk_size_bytes: 4096,
                ..
            }
        ));

        let error = GptDisk::plan(DISK_GUID, 16 * MIB + 1, &[]).unwrap_err();
        assert!(matches!(error, GptError::DiskSizeNotSectorMultiple { .. }));

        let mut duplicate = spec("root-b", Some(MIB));
        duplicate.unique_guid = Guid::derive(b"root-a");
        let error = GptDisk::plan(
            DISK_GUID,
            disk_size_bytes,
            &[spec("root-a", Some(MIB)), duplicate],
        )
        .unwrap_err();
        assert!(matches!(
            error,
            GptError::DuplicateUniqueGuid {
                first_number: 1,
                second_number: 2,
                ..
            }
        ));

        let mut zero = spec("esp", Some(MIB));
        zero.unique_guid = Guid::ZERO;
        let error = GptDisk::plan(DISK_GUID, disk_size_bytes, &[zero]).unwrap_err();
        assert!(matches!(error, GptError::ZeroGuid { .. }));

        let too_many: Vec<PartitionSpec> = (0..129)
            .map(|index| spec(&format!("p{index}"), Some(MIB)))
            .collect();
        let error = GptDisk::plan(DISK_GUID, 1024 * MIB, &too_many).unwrap_err();
        assert!(matches!(
            error,
            GptError::TooManyPartitions { count: 129, .. }
        ));
    }

    #[test]
    fn name_too_long_is_rejected() {
        let exactly_36 = "x".repeat(36);
        GptDisk::plan(DISK_GUID, 16 * MIB, &[spec(&exactly_36, Some(MIB))])
            .expect("36 code units fit");
        let long_name = "y".repeat(37);
        let error = GptDisk::plan(DISK_GUID, 16 * MIB, &[spec(&long_name, Some(MIB))]).unwrap_err();
        assert!(
            matches!(&error, GptError::NameTooLong { name, units: 37 } if *name == long_name),
            "{error}"
        );
        // Characters outside the Basic Multilingual Plane take two UTF-16 units.
        let emoji_name = "🦀".repeat(19);
        let error =
            GptDisk::plan(DISK_GUID, 16 * MIB, &[spec(&emoji_name, Some(MIB))]).unwrap_err();
        assert!(matches!(error, GptError::NameTooLong { units: 38, .. }));
        let error = GptDisk::plan(DISK_GUID, 16 * MIB, &[spec("a\0b", Some(MIB))]).unwrap_err();
        assert!(matches!(error, GptError::NameContainsNul { .. }));
    }

    #[test]
    fn write_then_read_round_trips() {
        let mut gpt = sample_disk(16 * MIB);
        gpt.partitions[0].name = "EFI Systempartition ü 🦀".to_owned();
        let image = written_image(&gpt);
        let (read_back, source) =
            GptDisk::read_with_report(&mut Cursor::new(&image), 16 * MIB).unwrap();
        assert_eq!(source, GptSource::Primary);
        assert_eq!(read_back, gpt);

        let (number, entry) = read_back
            .find_by_unique_guid(&Guid::derive(b"root-a"))
            .unwrap();
        assert_eq!(number, 2);
        assert_eq!(entry.name, "root-a");
        assert_eq!(read_back.find_by_name("data").unwrap().0, 3);
        assert!(read_back.find_by_name("missing").is_none());
        assert!(read_back.find_by_unique_guid(&Guid::ZERO).is_none());
    }

    #[test]
    fn write_layout_is_exact_and_deterministic() {
        let disk_size_bytes = 16 * MIB;
        let gpt = sample_disk(disk_size_bytes);
        let image = written_image(&gpt);
        assert_eq!(image, written_image(&gpt.clone()), "same input, same bytes");
        let disk_sectors = disk_size_bytes / SECTOR_SIZE;
        let sector =
            |lba: u64| &image[(lba * SECTOR_SIZE) as usize..((lba + 1) * SECTOR_SIZE) as usize];

        let mbr = sector(0);
        assert!(
            mbr[..446].iter().all(|&byte| byte == 0),
            "boot code and disk signature zero"
        );
        assert_eq!(mbr[446 + 4], 0xEE);
        assert_eq!(le_u32(mbr, 446 + 8), 1);
        assert_eq!(u64::from(le_u32(mbr, 446 + 12)), disk_sectors - 1);
        assert!(
            mbr[462..510].iter().all(|&byte| byte == 0),
            "other MBR records empty"
        );
        assert_eq!(mbr[510..], [0x55, 0xAA]);

        let primary = sector(1);
        assert_eq!(&primary[..8], b"EFI PART");
        assert_eq!(le_u32(primary, 8), 0x0001_0000);
        assert_eq!(le_u32(primary, 12), 92);
        assert_eq!(le_u64(primary, 24), 1);
        assert_eq!(le_u64(primary, 32), disk_sectors - 1);
        assert_eq!(le_u64(primary, 40), 34);
        assert_eq!(le_u64(primary, 48), disk_sectors - 34);
        assert_eq!(primary[56..72], DISK_GUID.to_gpt_bytes());
        assert_eq!(le_u64(primary, 72), 2);
        assert_eq!(le_u32(primary, 80), 128);
        assert_eq!(le_u32(primary, 84), 128);
        assert!(primary[92..].iter().all(|&byte| byte == 0));

        let backup = sector(disk_sectors - 1);
        assert_eq!(le_u64(backup, 24), disk_sectors - 1);
        assert_eq!(le_u64(backup, 32), 1);
        assert_eq!(le_u64(backup, 72), disk_sectors - 33);

        let primary_entries = &image[1024..1024 + 16384];
        let backup_start = ((disk_sectors - 33) * SECTOR_SIZE) as usize;
        assert_eq!(primary_entries, &image[backup_start..backup_start + 16384]);
        assert_eq!(primary_entries[..16], ESP_TYPE.to_gpt_bytes());
        assert!(
            primary_entries[3 * 128..].iter().all(|&byte| byte == 0),
            "unused entries are all zero"
        );
        // Partition contents were not touched.
        let data = &gpt.partitions[2];
        assert!(image
            [data.offset_bytes() as usize..(data.offset_bytes() + data.size_bytes()) as usize]
            .iter()
            .all(|&byte| byte == 0));
    }

    #[test]
    fn write_extends_a_short_disk() {
        let gpt = sample_disk(16 * MIB);
        let mut image = Cursor::new(Vec::new());
        gpt.write(&mut image).unwrap();
        assert_eq!(image.get_ref().len() as u64, 16 * MIB);
        assert_eq!(GptDisk::read(&mut image, 16 * MIB).unwrap(), gpt);
    }

    #[test]
    fn damaged_primary_header_falls_back_to_backup() {
        let gpt = sample_disk(16 * MIB);
        let mut image = written_image(&gpt);
        image[512 + 40] ^= 0x01; // first usable LBA, covered by the header CRC
        let primary_error =
            read_table(&mut Cursor::new(&image), 16 * MIB / SECTOR_SIZE, 1).unwrap_err();
        assert!(matches!(primary_error, GptError::HeaderCrc { lba: 1, .. }));
        let (read_back, source) =
            GptDisk::read_with_report(&mut Cursor::new(&image), 16 * MIB).unwrap();
        assert_eq!(source, GptSource::Backup);
        assert_eq!(read_back, gpt);
    }

    #[test]
    fn damaged_primary_entries_fall_back_to_backup() {
        let gpt = sample_disk(16 * MIB);
        let mut image = written_image(&gpt);
        image[1024 + 128 + 60] ^= 0xFF; // a name byte of partition 2
        let (read_back, source) =
            GptDisk::read_with_report(&mut Cursor::new(&image), 16 * MIB).unwrap();
        assert_eq!(source, GptSource::Backup);
        assert_eq!(read_back, gpt);
    }

    #[test]
    fn both_copies_damaged_is_an_error() {
        let gpt = sample_disk(16 * MIB);
        let mut image = written_image(&gpt);
        image[512] = b'X'; // primary signature
        let last_entries = (16 * MIB - 33 * SECTOR_SIZE) as usize;
        image[last_entries + 5] ^= 0xFF; // backup entry array
        let error = GptDisk::read(&mut Cursor::new(&image), 16 * MIB).unwrap_err();
        match &error {
            GptError::NoValidHeader { primary, backup } => {
                assert!(matches!(**primary, GptError::BadSignature { lba: 1, .. }));
                assert!(matches!(**backup, GptError::EntriesCrc { .. }));
            }
            other => panic!("expected NoValidHeader, found {other}"),
        }
        let message = error.to_string();
        assert!(
            message.contains("expected signature \"EFI PART\", found \"XFI PART\""),
            "{message}"
        );
        assert!(message.contains("CRC32"), "{message}");
    }

    #[test]
    fn missing_protective_mbr_is_an_error() {
        let gpt = sample_disk(16 * MIB);
        let mut image = written_image(&gpt);
        image[446 + 4] = 0x83;
        let error = GptDisk::read(&mut Cursor::new(&image), 16 * MIB).unwrap_err();
        assert!(matches!(
            error,
            GptError::NotProtectiveMbr {
                found_types: [0x83, 0, 0, 0]
            }
        ));
        assert!(error
            .to_string()
            .contains("expected a partition of type 0xee"));

        image[510] = 0;
        let error = GptDisk::read(&mut Cursor::new(&image), 16 * MIB).unwrap_err();
        assert!(matches!(
            error,
            GptError::BadBootSignature { found: [0, 0xAA] }
        ));
    }

    #[test]
    fn image_on_a_larger_disk_reads_from_primary() {
        let gpt = sample_disk(16 * MIB);
        let mut image = written_image(&gpt);
        image.resize((32 * MIB) as usize, 0);
        let (read_back, source) =
            GptDisk::read_with_report(&mut Cursor::new(&image), 32 * MIB).unwrap();
        assert_eq!(source, GptSource::Primary);
        assert_eq!(read_back.partitions, gpt.partitions);
        assert_eq!(read_back.disk_size_bytes, 32 * MIB);
        assert_eq!(read_back.last_usable_lba(), 32 * MIB / SECTOR_SIZE - 34);
    }

    #[test]
    fn truncated_disk_is_an_error() {
        let gpt = sample_disk(16 * MIB);
        let image = written_image(&gpt);
        let error =
            GptDisk::read(&mut Cursor::new(&image[..(8 * MIB) as usize]), 8 * MIB).unwrap_err();
        assert!(matches!(error, GptError::NoValidHeader { .. }), "{error}");
    }

    #[test]
    fn gaps_in_the_table_keep_partition_numbers() {
        let mut gpt = sample_disk(16 * MIB);
        gpt.partitions[1] = PartitionEntry::default();
        let image = written_image(&gpt);
        let read_back = GptDisk::read(&mut Cursor::new(&image), 16 * MIB).unwrap();
        assert_eq!(read_back, gpt);
        assert_eq!(read_back.find_by_name("data").unwrap().0, 3);
    }

    #[test]
    fn write_rejects_invalid_tables() {
        let mut gpt = sample_disk(16 * MIB);
        gpt.partitions[1].first_lba = gpt.partitions[0].last_lba;
        let error = gpt.write(&mut Cursor::new(Vec::new())).unwrap_err();
        assert!(
            matches!(
                error,
                GptError::Overlap {
                    first_number: 1,
                    second_number: 2,
                    ..
                }
            ),
            "{error}"
        );

        let mut gpt = sample_disk(16 * MIB);
        gpt.partitions[2].last_lba = gpt.last_usable_lba() + 1;
        let error = gpt.write(&mut Cursor::new(Vec::new())).unwrap_err();
        assert!(
            matches!(error, GptError::PartitionOutOfRange { number: 3, .. }),
            "{error}"
        );

        let mut gpt = sample_disk(16 * MIB);
        gpt.partitions[0].last_lba = gpt.partitions[0].first_lba - 1;
        let error = gpt.write(&mut Cursor::new(Vec::new())).unwrap_err();
        assert!(
            matches!(error, GptError::BadPartitionRange { number: 1, .. }),
            "{error}"
        );
    }

    #[test]
    fn protective_mbr_size_is_capped() {
        let huge_disk_sectors = 1u64 << 33;
        let mbr = protective_mbr(huge_disk_sectors);
        assert_eq!(le_u32(&mbr, 446 + 12), u32::MAX);
        assert_eq!(mbr[446 + 5..446 + 8], [0xFF, 0xFF, 0xFF]);
        assert_eq!(mbr[446 + 1..446 + 4], [0x00, 0x02, 0x00]);
    }

    // ---- patch_unique_guids ----

    /// Sectors of the small disk the patch tests use.
    const SMALL_DISK_SECTORS: u64 = 128;
    /// Bytes of one entry array of 128 entries of 128 bytes.
    const ENTRY_ARRAY_BYTES: usize = 16384;

    /// A small table written by hand (partitions need not be 1 MiB aligned), so
    /// images are 64 KiB: esp, root-b, verity-b, data.
    fn small_disk() -> GptDisk {
        let entry = |name: &str, first_lba: u64, last_lba: u64| PartitionEntry {
            type_guid: if name == "esp" {
                ESP_TYPE
            } else {
                LINUX_DATA_TYPE
            },
            unique_guid: Guid::derive(name.as_bytes()),
            first_lba,
            last_lba,
            attributes: ATTRIBUTE_READ_ONLY,
            name: name.to_owned(),
        };
        GptDisk {
            disk_guid: DISK_GUID,
            disk_size_bytes: SMALL_DISK_SECTORS * SECTOR_SIZE,
            partitions: vec![
                entry("esp", 34, 49),
                entry("root-b", 50, 69),
                entry("verity-b", 70, 79),
                entry("data", 80, 94),
            ],
        }
    }

    /// Deterministic non-zero filler, so untouched bytes differ from zeros.
    fn background(len: usize) -> Vec<u8> {
        (0..len)
            .map(|index| (index as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] | 1)
            .collect()
    }

    /// `gpt` written over pseudo-random bytes.
    fn image_over_background(gpt: &GptDisk) -> Vec<u8> {
        let mut image = Cursor::new(background(gpt.disk_size_bytes as usize));
        gpt.write(&mut image).expect("write GPT");
        image.into_inner()
    }

    /// Changes giving root-b and verity-b (entries 1 and 2) new GUIDs.
    fn slot_changes(gpt: &GptDisk, seed: &str) -> Vec<UniqueGuidChange> {
        [1u32, 2]
            .iter()
            .map(|&entry_index| UniqueGuidChange {
                entry_index,
                expected: gpt.partitions[entry_index as usize].unique_guid,
                new: Guid::derive(format!("{seed}/{entry_index}").as_bytes()),
            })
            .collect()
    }

    /// The same changes undone (from the new GUIDs back to the old).
    fn reversed(changes: &[UniqueGuidChange]) -> Vec<UniqueGuidChange> {
        changes
            .iter()
            .map(|change| UniqueGuidChange {
                entry_index: change.entry_index,
                expected: change.new,
                new: change.expected,
            })
            .collect()
    }

    /// Runs the patch on an in-memory image; returns the result and the image
    /// as it was at each sync.
    fn patch(
        image: &mut Vec<u8>,
        changes: &[UniqueGuidChange],
    ) -> (Result<PatchReport, GptError>, Vec<Vec<u8>>) {
        let disk_size_bytes = image.len() as u64;
        let mut disk = Cursor::new(std::mem::take(image));
        let mut at_sync = Vec::new();
        let result = patch_unique_guids(
            &mut disk,
            disk_size_bytes,
            changes,
            |disk: &mut Cursor<Vec<u8>>| {
                at_sync.push(disk.get_ref().clone());
                Ok(())
            },
        );
        *image = disk.into_inner();
        (result, at_sync)
    }

    /// Byte offsets of the GPT fields a patch of `entry_indexes` may change:
    /// both header CRCs, both entry array CRCs, the GUIDs of those entries in
    /// both arrays.
    fn patchable_bytes(disk_sectors: u64, entry_indexes: &[u32]) -> Vec<std::ops::Range<usize>> {
        let sector = SECTOR_SIZE as usize;
        let backup_header = (disk_sectors as usize - 1) * sector;
        let backup_entries = backup_header - 32 * sector;
        let mut ranges = Vec::new();
        for header in [sector, backup_header] {
            ranges.push(header + 16..header + 20);
            ranges.push(header + 88..header + 92);
        }
        for entries in [2 * sector, backup_entries] {
            for &index in entry_indexes {
                let start = entries + index as usize * 128 + 16;
                ranges.push(start..start + 16);
            }
        }
        ranges
    }

    /// Asserts that `before` and `after` differ only inside `allowed`.
    fn assert_differs_only_in(before: &[u8], after: &[u8], allowed: &[std::ops::Range<usize>]) {
        assert_eq!(before.len(), after.len());
        for (offset, (old, new)) in before.iter().zip(after).enumerate() {
            if old != new {
                assert!(
                    allowed.iter().any(|range| range.contains(&offset)),
                    "byte {offset} changed from {old:#04x} to {new:#04x}, outside the GUID and \
                     CRC fields"
                );
            }
        }
    }

    /// The unique GUIDs readers see for entries 1 and 2.
    fn slot_guids(image: &[u8]) -> [Guid; 2] {
        let gpt = GptDisk::read(&mut Cursor::new(image), image.len() as u64).unwrap();
        [gpt.partitions[1].unique_guid, gpt.partitions[2].unique_guid]
    }

    /// The unique GUIDs `changes` set.
    fn new_guids(changes: &[UniqueGuidChange]) -> [Guid; 2] {
        [changes[0].new, changes[1].new]
    }

    /// The unique GUIDs `changes` replace.
    fn old_guids(changes: &[UniqueGuidChange]) -> [Guid; 2] {
        [changes[0].expected, changes[1].expected]
    }

    /// Checks a disk image with `sgdisk -v` (package `gdisk`), which must be on PATH.
    fn assert_sgdisk_verifies(image: &[u8]) {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(image).unwrap();
        file.flush().unwrap();
        let output = std::process::Command::new("sgdisk")
            .arg("-v")
            .arg(file.path())
            .output()
            .unwrap_or_else(|error| {
                panic!(
                    "could not run `sgdisk` ({error}); expected it on PATH: install the `gdisk` \
                     package"
                )
            });
        let report = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && report.contains("No problems found"),
            "sgdisk -v: {report}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    #[test]
    fn crc32_is_the_gpt_crc() {
        // GPT uses CRC-32/ISO-HDLC (zlib's crc32); this is its standard check value.
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32fast::hash(b""), 0);
    }

    #[test]
    fn patch_changes_only_the_guids_and_the_crcs() {
        let gpt = small_disk();
        let original = image_over_background(&gpt);
        let changes = slot_changes(&gpt, "new");
        let mut image = original.clone();

        let (result, at_sync) = patch(&mut image, &changes);
        let report = result.unwrap();
        assert_eq!(report.source, GptSource::Primary);
        assert_eq!(report.rebuilt, None);
        assert!(!report.copies_differed);
        assert_eq!(report.written, [GptSource::Backup, GptSource::Primary]);
        assert_eq!(report.before, gpt);
        let mut expected = gpt.clone();
        expected.partitions[1].unique_guid = changes[0].new;
        expected.partitions[2].unique_guid = changes[1].new;
        assert_eq!(report.after, expected);
        assert_differs_only_in(
            &original,
            &image,
            &patchable_bytes(SMALL_DISK_SECTORS, &[1, 2]),
        );
        assert_eq!(slot_guids(&image), new_guids(&changes));

        // The backup was complete and synced before the primary was touched.
        let [after_backup, after_primary] = &at_sync[..] else {
            panic!("expected two syncs, found {}", at_sync.len());
        };
        let primary_end = 34 * SECTOR_SIZE as usize;
        assert_eq!(after_backup[..primary_end], original[..primary_end]);
        assert_eq!(after_backup[primary_end..], image[primary_end..]);
        assert_eq!(slot_guids(after_backup), old_guids(&changes));
        assert_eq!(after_primary, &image);

        // Both copies carry the new GUIDs.
        let mut damaged = image.clone();
        damaged[SECTOR_SIZE as usize + 16] ^= 0xFF; // primary header CRC
        let (from_backup, source) =
            GptDisk::read_with_report(&mut Cursor::new(&damaged), damaged.len() as u64).unwrap();
        assert_eq!(source, GptSource::Backup);
        assert_eq!(from_backup, expected);
        assert_sgdisk_verifies(&image);

        // Undoing gives the original bytes exactly.
        let (result, _) = patch(&mut image, &reversed(&changes));
        assert_eq!(result.unwrap().written.len(), 2);
        assert_eq!(image, original);
        // Asking for what is already there writes and syncs nothing.
        let (result, at_sync) = patch(&mut image, &reversed(&changes));
        let report = result.unwrap();
        assert!(report.written.is_empty());
        assert!(at_sync.is_empty());
        assert_eq!(report.after, gpt);
        assert_eq!(image, original);
    }

    #[test]
    fn patch_keeps_header_bytes_it_does_not_own() {
        let gpt = small_disk();
        let mut image = image_over_background(&gpt);
        // Both headers claim 96 bytes (4 more than defined, covered by the CRC)
        // and carry non-zero bytes beyond.
        let sector = SECTOR_SIZE as usize;
        for header_offset in [sector, (SMALL_DISK_SECTORS as usize - 1) * sector] {
            let header: &mut [u8; SECTOR_SIZE as usize] = (&mut image
                [header_offset..header_offset + sector])
                .try_into()
                .unwrap();
            put_u32(header, 12, 96);
            header[92..].fill(0x5A);
            let crc = header_crc(header, 96);
            put_u32(header, HEADER_CRC_OFFSET, crc);
        }
        let original = image.clone();
        assert_eq!(
            GptDisk::read_with_report(&mut Cursor::new(&image), image.len() as u64)
                .unwrap()
                .1,
            GptSource::Primary
        );
        let changes = slot_changes(&gpt, "new");
        let (result, _) = patch(&mut image, &changes);
        result.unwrap();
        assert_differs_only_in(
            &original,
            &image,
            &patchable_bytes(SMALL_DISK_SECTORS, &[1, 2]),
        );
        let (_, source) =
            GptDisk::read_with_report(&mut Cursor::new(&image), image.len() as u64).unwrap();
        assert_eq!(source, GptSource::Primary);
        // The backup's header CRC covers its 96 bytes too.
        image[SECTOR_SIZE as usize] = b'X';
        let (read_back, source) =
            GptDisk::read_with_report(&mut Cursor::new(&image), image.len() as u64).unwrap();
        assert_eq!(source, GptSource::Backup);
        assert_eq!(
            [
                read_back.partitions[1].unique_guid,
                read_back.partitions[2].unique_guid
            ],
            new_guids(&changes)
        );
    }

    #[test]
    fn torn_primary_is_rebuilt_from_the_backup() {
        let gpt = small_disk();
        let mut image = image_over_background(&gpt);
        let changes = slot_changes(&gpt, "new");
        patch(&mut image, &changes).0.unwrap();
        let expected = image.clone();

        // Interrupted while writing the primary header: readers use the backup.
        image[SECTOR_SIZE as usize + 40..SECTOR_SIZE as usize + 48].fill(0xAA);
        assert_eq!(slot_guids(&image), new_guids(&changes));
        let (result, at_sync) = patch(&mut image, &changes);
        let report = result.unwrap();
        assert_eq!(report.source, GptSource::Backup);
        let (copy, reason) = report.rebuilt.unwrap();
        assert_eq!(copy, GptSource::Primary);
        assert!(reason.contains("CRC32"), "{reason}");
        assert_eq!(report.written, [GptSource::Primary]);
        assert_eq!(at_sync.len(), 1);
        assert_eq!(image, expected, "primary rebuilt exactly");

        // Interrupted while writing the primary entries.
        image[2 * SECTOR_SIZE as usize + 128 + 20] ^= 0xFF;
        let (result, _) = patch(&mut image, &changes);
        assert_eq!(result.unwrap().source, GptSource::Backup);
        assert_eq!(image, expected, "primary rebuilt exactly");
    }

    #[test]
    fn torn_backup_is_rebuilt_from_the_primary() {
        let gpt = small_disk();
        let original = image_over_background(&gpt);
        let changes = slot_changes(&gpt, "new");
        let mut expected = original.clone();
        patch(&mut expected, &changes).0.unwrap();

        // Interrupted while writing the backup entries: the primary is still old.
        let mut image = original.clone();
        let backup_entries = ((SMALL_DISK_SECTORS - 33) * SECTOR_SIZE) as usize;
        image[backup_entries + 128..backup_entries + 192].fill(0x55);
        assert_eq!(slot_guids(&image), old_guids(&changes));
        let (result, _) = patch(&mut image, &changes);
        let report = result.unwrap();
        assert_eq!(report.source, GptSource::Primary);
        let (copy, reason) = report.rebuilt.unwrap();
        assert_eq!(copy, GptSource::Backup);
        assert!(reason.contains("LBA 127"), "{reason}");
        assert_eq!(report.written, [GptSource::Backup, GptSource::Primary]);
        assert_eq!(image, expected, "backup rebuilt exactly");

        // The backup header gone entirely.
        let mut image = original.clone();
        let backup_header = ((SMALL_DISK_SECTORS - 1) * SECTOR_SIZE) as usize;
        image[backup_header..].fill(0);
        let (result, _) = patch(&mut image, &changes);
        assert!(result.unwrap().rebuilt.is_some());
        assert_eq!(image, expected, "backup rebuilt exactly");
        assert_sgdisk_verifies(&image);
    }

    #[test]
    fn differing_backup_is_made_equal_to_the_primary() {
        let gpt = small_disk();
        let mut image = image_over_background(&gpt);
        let changes = slot_changes(&gpt, "new");
        let mut expected = image.clone();
        patch(&mut expected, &changes).0.unwrap();

        // A valid backup whose "data" entry has another name.
        let disk_sectors = SMALL_DISK_SECTORS;
        let mut disk = Cursor::new(image);
        let backup = read_raw_table(&mut disk, disk_sectors, disk_sectors - 1).unwrap();
        let mut entries = backup.entries.clone();
        entries[3 * 128 + 56] = b'D';
        backup
            .with_entries(&entries)
            .write(&mut disk, GptSource::Backup)
            .unwrap();
        image = disk.into_inner();

        let (result, _) = patch(&mut image, &changes);
        let report = result.unwrap();
        assert!(report.copies_differed);
        assert_eq!(report.rebuilt, None);
        assert_eq!(image, expected);
    }

    #[test]
    fn patch_works_on_the_standard_layout() {
        let gpt = sample_disk(16 * MIB);
        let original = written_image(&gpt);
        let mut image = original.clone();
        let changes = slot_changes(&gpt, "standard");
        let (result, _) = patch(&mut image, &changes);
        let report = result.unwrap();
        assert_eq!(report.written.len(), 2);
        assert_differs_only_in(
            &original,
            &image,
            &patchable_bytes(16 * MIB / SECTOR_SIZE, &[1, 2]),
        );
        assert_sgdisk_verifies(&image);
    }

    /// A disk that loses power after `budget` more bytes were written: writes
    /// beyond fail (a write may be cut off in the middle).
    struct CrashingDisk {
        inner: Cursor<Vec<u8>>,
        budget: usize,
    }

    impl Read for CrashingDisk {
        fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
            self.inner.read(buffer)
        }
    }

    impl Write for CrashingDisk {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            if self.budget == 0 {
                return Err(io::Error::other("power cut"));
            }
            let length = bytes.len().min(self.budget);
            self.budget -= length;
            self.inner.write(&bytes[..length])
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Seek for CrashingDisk {
        fn seek(&mut self, position: SeekFrom) -> io::Result<u64> {
            self.inner.seek(position)
        }
    }

    #[test]
    fn interrupted_patch_shows_old_or_new_and_a_retry_completes_it() {
        let gpt = small_disk();
        let original = image_over_background(&gpt);
        let changes = slot_changes(&gpt, "new");
        let mut expected = original.clone();
        patch(&mut expected, &changes).0.unwrap();
        let copy_bytes = ENTRY_ARRAY_BYTES + SECTOR_SIZE as usize;
        let total = 2 * copy_bytes;

        let mut budgets: Vec<usize> = (0..total).step_by(61).collect();
        for boundary in [
            ENTRY_ARRAY_BYTES,
            copy_bytes,
            copy_bytes + ENTRY_ARRAY_BYTES,
            total,
        ] {
            budgets.extend([boundary - 1, boundary, boundary + 1]);
        }
        for budget in budgets {
            let mut disk = CrashingDisk {
                inner: Cursor::new(original.clone()),
                budget,
            };
            let result = patch_unique_guids(&mut disk, original.len() as u64, &changes, |_| Ok(()));
            let mut image = disk.inner.into_inner();
            if budget >= total {
                result.unwrap();
                assert_eq!(image, expected);
                continue;
            }
            match result {
                Err(GptError::Io { action, source }) => {
                    assert!(action.starts_with("writing the"), "{action}");
                    assert_eq!(source.to_string(), "power cut");
                }
                other => panic!("budget {budget}: expected a write error, found {other:?}"),
            }
            // Readers see the old GUIDs or the new ones, never a mix; the old
            // ones until the backup is complete.
            let seen = slot_guids(&image);
            assert!(
                seen == old_guids(&changes) || seen == new_guids(&changes),
                "budget {budget}: readers see {seen:?}"
            );
            if budget <= copy_bytes {
                assert_eq!(seen, old_guids(&changes), "budget {budget}");
            }
            let (result, _) = patch(&mut image, &changes);
            result.unwrap_or_else(|error| panic!("budget {budget}: retry failed: {error}"));
            assert_eq!(
                image, expected,
                "budget {budget}: retry completes the patch"
            );
        }
    }

    #[test]
    fn invalid_changes_are_refused_before_writing() {
        let gpt = small_disk();
        let original = image_over_background(&gpt);
        let good = slot_changes(&gpt, "new");
        let refused = |changes: &[UniqueGuidChange]| {
            let mut image = original.clone();
            let (result, at_sync) = patch(&mut image, changes);
            assert!(at_sync.is_empty());
            assert_eq!(image, original, "nothing written");
            result.unwrap_err()
        };
        let with = |index: usize, change: UniqueGuidChange| {
            let mut changes = good.clone();
            changes[index] = change;
            changes
        };

        let error = refused(&with(
            0,
            UniqueGuidChange {
                entry_index: 128,
                ..good[0]
            },
        ));
        assert!(
            matches!(
                error,
                GptError::NoSuchEntry {
                    entry_index: 128,
                    entry_count: 128
                }
            ),
            "{error}"
        );
        let error = refused(&with(
            0,
            UniqueGuidChange {
                entry_index: 4,
                ..good[0]
            },
        ));
        assert!(
            matches!(error, GptError::UnusedEntry { number: 5 }),
            "{error}"
        );
        let error = refused(&with(1, good[0]));
        assert!(
            matches!(error, GptError::RepeatedEntry { number: 2 }),
            "{error}"
        );
        let error = refused(&with(
            1,
            UniqueGuidChange {
                expected: Guid::derive(b"something else"),
                ..good[1]
            },
        ));
        assert!(
            matches!(
                &error,
                GptError::CopyUnusable {
                    copy: GptSource::Primary,
                    reason
                } if reason.contains("\"verity-b\"")
            ),
            "{error}"
        );
        let error = refused(&with(
            1,
            UniqueGuidChange {
                new: Guid::ZERO,
                ..good[1]
            },
        ));
        assert!(matches!(error, GptError::ZeroGuid { .. }), "{error}");
        // The GUID of an entry that keeps it.
        let error = refused(&with(
            1,
            UniqueGuidChange {
                new: Guid::derive(b"data"),
                ..good[1]
            },
        ));
        assert!(
            matches!(
                &error,
                GptError::DuplicateUniqueGuid {
                    first_number: 3,
                    second_number: 4,
                    second_name,
                    ..
                } if second_name == "data"
            ),
            "{error}"
        );
        // Two changes to the same new GUID.
        let error = refused(&with(
            1,
            UniqueGuidChange {
                new: good[0].new,
                ..good[1]
            },
        ));
        assert!(
            matches!(
                error,
                GptError::DuplicateUniqueGuid {
                    first_number: 2,
                    second_number: 3,
                    ..
                }
            ),
            "{error}"
        );
        // Swapping two GUIDs is fine.
        let mut image = original.clone();
        let swap = [
            UniqueGuidChange {
                new: good[1].expected,
                ..good[0]
            },
            UniqueGuidChange {
                new: good[0].expected,
                ..good[1]
            },
        ];
        patch(&mut image, &swap).0.unwrap();
        assert_eq!(slot_guids(&image), [good[1].expected, good[0].expected]);
    }

    #[test]
    fn sync_failure_is_reported() {
        let gpt = small_disk();
        let mut disk = Cursor::new(image_over_background(&gpt));
        let changes = slot_changes(&gpt, "new");
        let error = patch_unique_guids(&mut disk, gpt.disk_size_bytes, &changes, |_| {
            Err(io::Error::other("fsync failed"))
        })
        .unwrap_err();
        match &error {
            GptError::Io { action, .. } => {
                assert_eq!(action, "syncing the backup GPT to the disk")
            }
            other => panic!("expected an I/O error, found {other}"),
        }
        // Nothing of the primary was written.
        assert_eq!(slot_guids(disk.get_ref()), old_guids(&changes));
    }
}
