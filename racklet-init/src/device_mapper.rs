//! The device-mapper ioctl interface (`linux/dm-ioctl.h`, version 4), by hand.
//!
//! Every ioctl on [`DM_CONTROL_PATH`] takes one buffer: a [`DmIoctl`] header,
//! then (from `data_start`) the payload. `DM_TABLE_LOAD`'s payload is one
//! [`DmTargetSpec`] per target, each followed by its NUL-terminated parameter
//! string and padded to 8 bytes; `next` is the offset from the start of one
//! spec to the start of the next.
// PID 1's syscalls: the device-mapper ioctls, by hand (SAFETY comments at each call).
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::mem::size_of;
use std::os::fd::AsRawFd;

/// The device-mapper control node (devtmpfs creates it when `dm-mod` loads).
pub(crate) const DM_CONTROL_PATH: &str = "/dev/mapper/control";

/// Interface version we speak; the kernel accepts any request with the same
/// major and a minor no newer than its own.
pub(crate) const DM_VERSION: [u32; 3] = [4, 0, 0];
/// `DM_NAME_LEN`: device name field size, NUL included.
pub(crate) const DM_NAME_LEN: usize = 128;
/// `DM_UUID_LEN`: device UUID field size, NUL included.
pub(crate) const DM_UUID_LEN: usize = 129;
/// `DM_MAX_TYPE_NAME`: target type field size, NUL included.
pub(crate) const DM_MAX_TYPE_NAME: usize = 16;

/// `DM_READONLY_FLAG`: the device (and the table) is read-only.
pub(crate) const DM_READONLY_FLAG: u32 = 1 << 0;

/// The `ioctl` type byte of device-mapper (`DM_IOCTL`).
const DM_IOCTL_TYPE: u32 = 0xfd;
/// Command numbers (`enum { DM_VERSION_CMD = 0, ... }`).
const DM_VERSION_CMD: u32 = 0;
const DM_DEV_CREATE_CMD: u32 = 3;
const DM_DEV_REMOVE_CMD: u32 = 4;
const DM_DEV_SUSPEND_CMD: u32 = 6;
const DM_TABLE_LOAD_CMD: u32 = 9;
/// Alignment of each target spec in a table payload.
const TARGET_SPEC_ALIGN: usize = 8;
/// Bytes of the `dev_t` encoding the kernel returns (`huge_encode_dev`).
const MINOR_LOW_BITS: u64 = 0xff;

/// `struct dm_ioctl`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct DmIoctl {
    /// Interface version, in: what we speak; out: what the kernel speaks.
    pub version: [u32; 3],
    /// Total buffer size, header included.
    pub data_size: u32,
    /// Offset of the payload from the start of the header.
    pub data_start: u32,
    /// Number of targets in the payload (table load) or reply.
    pub target_count: u32,
    /// Out: number of openers.
    pub open_count: i32,
    /// `DM_*_FLAG` bits, in and out.
    pub flags: u32,
    /// Uevent cookie / event number.
    pub event_nr: u32,
    /// Explicit padding in the kernel header.
    pub padding: u32,
    /// Device number, in `huge_encode_dev` form.
    pub dev: u64,
    /// Device name, NUL-terminated.
    pub name: [u8; DM_NAME_LEN],
    /// Device UUID, NUL-terminated.
    pub uuid: [u8; DM_UUID_LEN],
    /// Padding (or the first bytes of the payload in old userspace).
    pub data: [u8; 7],
}

/// `struct dm_target_spec`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct DmTargetSpec {
    /// First sector of the device this target maps.
    pub sector_start: u64,
    /// Number of sectors it maps.
    pub length: u64,
    /// Out: target status.
    pub status: i32,
    /// Offset from the start of this spec to the next one.
    pub next: u32,
    /// Target type name (`verity`), NUL-terminated.
    pub target_type: [u8; DM_MAX_TYPE_NAME],
}

/// Size of the header: the kernel checks `data_start` against it.
pub(crate) const DM_IOCTL_SIZE: usize = size_of::<DmIoctl>();
/// Size of one target spec.
pub(crate) const DM_TARGET_SPEC_SIZE: usize = size_of::<DmTargetSpec>();

// The kernel ABI, checked at compile time: both structs are padding-free, so
// viewing them as bytes is sound.
const _: () = assert!(DM_IOCTL_SIZE == 312);
const _: () = assert!(DM_TARGET_SPEC_SIZE == 40);

/// `_IOWR(DM_IOCTL, nr, struct dm_ioctl)` (generic `_IOC` encoding, same on
/// x86-64 and arm64).
const fn dm_ioctl_request(nr: u32) -> u64 {
    const IOC_READ_WRITE: u64 = 3;
    (IOC_READ_WRITE << 30)
        | ((DM_IOCTL_SIZE as u64) << 16)
        | ((DM_IOCTL_TYPE as u64) << 8)
        | nr as u64
}

/// `DM_VERSION`.
pub(crate) const DM_VERSION_IOCTL: u64 = dm_ioctl_request(DM_VERSION_CMD);
/// `DM_DEV_CREATE`.
pub(crate) const DM_DEV_CREATE_IOCTL: u64 = dm_ioctl_request(DM_DEV_CREATE_CMD);
/// `DM_DEV_REMOVE`.
pub(crate) const DM_DEV_REMOVE_IOCTL: u64 = dm_ioctl_request(DM_DEV_REMOVE_CMD);
/// `DM_DEV_SUSPEND` (also resumes).
pub(crate) const DM_DEV_SUSPEND_IOCTL: u64 = dm_ioctl_request(DM_DEV_SUSPEND_CMD);
/// `DM_TABLE_LOAD`.
pub(crate) const DM_TABLE_LOAD_IOCTL: u64 = dm_ioctl_request(DM_TABLE_LOAD_CMD);

/// One line of a device-mapper table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Target {
    /// First sector mapped.
    pub start_sector: u64,
    /// Number of 512-byte sectors mapped.
    pub length_sectors: u64,
    /// Target type, e.g. `verity`.
    pub target_type: String,
    /// The target's parameters.
    pub params: String,
}

impl Target {
    /// The table line as `dmsetup table` prints it (the tests compare it).
    #[cfg(test)]
    pub(crate) fn table_line(&self) -> String {
        format!(
            "{} {} {} {}",
            self.start_sector, self.length_sectors, self.target_type, self.params
        )
    }
}

/// A device number split into major and minor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DeviceNumber {
    pub major: u32,
    pub minor: u32,
}

impl DeviceNumber {
    /// Decode the kernel's `huge_encode_dev` form (as in `dm_ioctl.dev`).
    pub(crate) fn from_huge_encoded(dev: u64) -> DeviceNumber {
        let major = ((dev >> 8) & 0xfff) as u32;
        let minor = ((dev & MINOR_LOW_BITS) | ((dev >> 12) & !MINOR_LOW_BITS)) as u32;
        DeviceNumber { major, minor }
    }
}

impl std::fmt::Display for DeviceNumber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// A request that does not fit the kernel structures.
#[derive(Debug, PartialEq, Eq)]
pub enum BufferError {
    /// The device name is empty, too long, or contains `/` or NUL.
    BadName(String),
    /// The target type is empty or too long.
    BadTargetType(String),
    /// The parameters contain a NUL byte.
    NulInParams,
}

impl std::fmt::Display for BufferError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BufferError::BadName(name) => write!(
                f,
                "device name {name:?} must be 1 to {} bytes without '/' or NUL",
                DM_NAME_LEN - 1
            ),
            BufferError::BadTargetType(kind) => write!(
                f,
                "target type {kind:?} must be 1 to {} bytes",
                DM_MAX_TYPE_NAME - 1
            ),
            BufferError::NulInParams => f.write_str("target parameters contain a NUL byte"),
        }
    }
}

impl std::error::Error for BufferError {}

impl From<BufferError> for io::Error {
    fn from(error: BufferError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidInput, error)
    }
}

impl DmIoctl {
    /// A header for device `name` (may be empty for `DM_VERSION`) with `flags`.
    pub(crate) fn new(name: &str, flags: u32) -> Result<DmIoctl, BufferError> {
        let mut header = DmIoctl {
            version: DM_VERSION,
            data_size: DM_IOCTL_SIZE as u32,
            data_start: DM_IOCTL_SIZE as u32,
            target_count: 0,
            open_count: 0,
            flags,
            event_nr: 0,
            padding: 0,
            dev: 0,
            name: [0; DM_NAME_LEN],
            uuid: [0; DM_UUID_LEN],
            data: [0; 7],
        };
        if name.len() >= DM_NAME_LEN || name.contains(['/', '\0']) {
            return Err(BufferError::BadName(name.to_string()));
        }
        header.name[..name.len()].copy_from_slice(name.as_bytes());
        Ok(header)
    }

    /// The header's bytes, as the kernel reads them.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        // SAFETY: `DmIoctl` is `repr(C)`, has no padding (checked by the size
        // assertion above: the fields sum to 312 bytes), and only plain integers.
        unsafe { std::slice::from_raw_parts((self as *const DmIoctl).cast(), DM_IOCTL_SIZE) }
    }

    /// Read a header back from the start of an ioctl buffer.
    pub(crate) fn from_buffer(buffer: &[u8]) -> DmIoctl {
        assert!(
            buffer.len() >= DM_IOCTL_SIZE,
            "ioctl buffer shorter than its header"
        );
        // SAFETY: the buffer holds at least DM_IOCTL_SIZE bytes and every bit
        // pattern is a valid `DmIoctl`; the read is unaligned-safe.
        unsafe { std::ptr::read_unaligned(buffer.as_ptr().cast()) }
    }

    /// The device number the kernel returned.
    pub(crate) fn device_number(&self) -> DeviceNumber {
        DeviceNumber::from_huge_encoded(self.dev)
    }
}

impl DmTargetSpec {
    /// The spec's bytes, as the kernel reads them.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        // SAFETY: `repr(C)`, padding-free (size assertion above), plain integers.
        unsafe {
            std::slice::from_raw_parts((self as *const DmTargetSpec).cast(), DM_TARGET_SPEC_SIZE)
        }
    }
}

/// The buffer for an ioctl that carries no payload.
pub(crate) fn simple_buffer(name: &str, flags: u32) -> Result<Vec<u8>, BufferError> {
    Ok(DmIoctl::new(name, flags)?.as_bytes().to_vec())
}

/// The buffer for `DM_TABLE_LOAD` of `targets` into device `name`.
pub(crate) fn table_load_buffer(
    name: &str,
    flags: u32,
    targets: &[Target],
) -> Result<Vec<u8>, BufferError> {
    let mut payload = Vec::new();
    for target in targets {
        let kind = target.target_type.as_bytes();
        if kind.is_empty() || kind.len() >= DM_MAX_TYPE_NAME || kind.contains(&0) {
            return Err(BufferError::BadTargetType(target.target_type.clone()));
        }
        if target.params.contains('\0') {
            return Err(BufferError::NulInParams);
        }
        let unpadded = DM_TARGET_SPEC_SIZE + target.params.len() + 1;
        let padded = unpadded.next_multiple_of(TARGET_SPEC_ALIGN);
        let mut spec = DmTargetSpec {
            sector_start: target.start_sector,
            length: target.length_sectors,
            status: 0,
            next: padded as u32,
            target_type: [0; DM_MAX_TYPE_NAME],
        };
        spec.target_type[..kind.len()].copy_from_slice(kind);
        payload.extend_from_slice(spec.as_bytes());
        payload.extend_from_slice(target.params.as_bytes());
        payload.resize(payload.len() + padded - unpadded + 1, 0);
    }
    let mut header = DmIoctl::new(name, flags)?;
    header.target_count = targets.len() as u32;
    header.data_size = (DM_IOCTL_SIZE + payload.len()) as u32;
    let mut buffer = header.as_bytes().to_vec();
    buffer.extend_from_slice(&payload);
    Ok(buffer)
}

/// An open `/dev/mapper/control`.
pub(crate) struct DeviceMapper {
    control: File,
}

impl DeviceMapper {
    /// Open the control node at `path`.
    pub(crate) fn open(path: &str) -> io::Result<DeviceMapper> {
        Ok(DeviceMapper {
            control: OpenOptions::new().read(true).write(true).open(path)?,
        })
    }

    /// Issue `request` on `buffer`; returns the header the kernel wrote back.
    fn ioctl(&self, request: u64, buffer: &mut [u8]) -> io::Result<DmIoctl> {
        // SAFETY: `buffer` starts with a complete header whose data_size is the
        // buffer's length, so the kernel reads and writes only inside it.
        let result =
            unsafe { libc::ioctl(self.control.as_raw_fd(), request as _, buffer.as_mut_ptr()) };
        if result == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(DmIoctl::from_buffer(buffer))
    }

    /// `DM_VERSION`: the kernel's interface version.
    pub(crate) fn version(&self) -> io::Result<[u32; 3]> {
        let mut buffer = simple_buffer("", 0)?;
        Ok(self.ioctl(DM_VERSION_IOCTL, &mut buffer)?.version)
    }

    /// `DM_DEV_CREATE`: a new, empty device named `name`.
    pub(crate) fn create_device(&self, name: &str, flags: u32) -> io::Result<DeviceNumber> {
        let mut buffer = simple_buffer(name, flags)?;
        Ok(self
            .ioctl(DM_DEV_CREATE_IOCTL, &mut buffer)?
            .device_number())
    }

    /// `DM_TABLE_LOAD`: load `targets` as the inactive table of `name`.
    pub(crate) fn load_table(&self, name: &str, flags: u32, targets: &[Target]) -> io::Result<()> {
        let mut buffer = table_load_buffer(name, flags, targets)?;
        self.ioctl(DM_TABLE_LOAD_IOCTL, &mut buffer).map(drop)
    }

    /// `DM_DEV_SUSPEND` without `DM_SUSPEND_FLAG`: make the loaded table live.
    pub(crate) fn resume(&self, name: &str) -> io::Result<DeviceNumber> {
        let mut buffer = simple_buffer(name, 0)?;
        Ok(self
            .ioctl(DM_DEV_SUSPEND_IOCTL, &mut buffer)?
            .device_number())
    }

    /// `DM_DEV_REMOVE`: remove device `name`.
    pub(crate) fn remove_device(&self, name: &str) -> io::Result<()> {
        let mut buffer = simple_buffer(name, 0)?;
        self.ioctl(DM_DEV_REMOVE_IOCTL, &mut buffer).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn header_layout_matches_linux_dm_ioctl_h() {
        assert_eq!(size_of::<DmIoctl>(), 312);
        assert_eq!(std::mem::align_of::<DmIoctl>(), 8);
        assert_eq!(offset_of!(DmIoctl, version), 0);
        assert_eq!(offset_of!(DmIoctl, data_size), 12);
        assert_eq!(offset_of!(DmIoctl, data_start), 16);
        assert_eq!(offset_of!(DmIoctl, target_count), 20);
        assert_eq!(offset_of!(DmIoctl, open_count), 24);
        assert_eq!(offset_of!(DmIoctl, flags), 28);
        assert_eq!(offset_of!(DmIoctl, event_nr), 32);
        assert_eq!(offset_of!(DmIoctl, padding), 36);
        assert_eq!(offset_of!(DmIoctl, dev), 40);
        assert_eq!(offset_of!(DmIoctl, name), 48);
        assert_eq!(offset_of!(DmIoctl, uuid), 176);
        assert_eq!(offset_of!(DmIoctl, data), 305);
    }

    #[test]
    fn target_spec_layout_matches_linux_dm_ioctl_h() {
        assert_eq!(size_of::<DmTargetSpec>(), 40);
        assert_eq!(offset_of!(DmTargetSpec, sector_start), 0);
        assert_eq!(offset_of!(DmTargetSpec, length), 8);
        assert_eq!(offset_of!(DmTargetSpec, status), 16);
        assert_eq!(offset_of!(DmTargetSpec, next), 20);
        assert_eq!(offset_of!(DmTargetSpec, target_type), 24);
    }

    #[test]
    fn ioctl_numbers_match_the_kernel() {
        // Values of the macros as compiled by the C preprocessor on x86-64/arm64.
        assert_eq!(DM_VERSION_IOCTL, 0xc138_fd00);
        assert_eq!(DM_DEV_CREATE_IOCTL, 0xc138_fd03);
        assert_eq!(DM_DEV_REMOVE_IOCTL, 0xc138_fd04);
        assert_eq!(DM_DEV_SUSPEND_IOCTL, 0xc138_fd06);
        assert_eq!(DM_TABLE_LOAD_IOCTL, 0xc138_fd09);
    }

    #[test]
    fn simple_buffer_carries_version_name_and_flags() {
        let buffer = simple_buffer("racklet-root", DM_READONLY_FLAG).unwrap();
        assert_eq!(buffer.len(), 312);
        assert_eq!(&buffer[0..12], &[4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&buffer[12..16], &312u32.to_ne_bytes());
        assert_eq!(&buffer[16..20], &312u32.to_ne_bytes());
        assert_eq!(&buffer[28..32], &1u32.to_ne_bytes());
        assert_eq!(&buffer[48..60], b"racklet-root");
        assert!(buffer[60..].iter().all(|&byte| byte == 0));
    }

    #[test]
    fn table_load_buffer_packs_specs_and_params() {
        let target = Target {
            start_sector: 0,
            length_sectors: 2048,
            target_type: "verity".into(),
            params: "1 254:2 254:3 4096 4096 256 1 sha256 ab 00".into(),
        };
        let buffer = table_load_buffer(
            "racklet-root",
            DM_READONLY_FLAG,
            std::slice::from_ref(&target),
        )
        .unwrap();
        let params_len = target.params.len();
        let spec_len = (40 + params_len + 1).next_multiple_of(8);
        assert_eq!(buffer.len(), 312 + spec_len);
        let header = DmIoctl::from_buffer(&buffer);
        assert_eq!(header.data_size as usize, buffer.len());
        assert_eq!(header.data_start, 312);
        assert_eq!(header.target_count, 1);
        assert_eq!(header.flags, DM_READONLY_FLAG);
        let spec = &buffer[312..];
        assert_eq!(&spec[0..8], &0u64.to_ne_bytes());
        assert_eq!(&spec[8..16], &2048u64.to_ne_bytes());
        assert_eq!(&spec[20..24], &(spec_len as u32).to_ne_bytes());
        assert_eq!(&spec[24..31], b"verity\0");
        assert_eq!(&spec[40..40 + params_len], target.params.as_bytes());
        assert!(spec[40 + params_len..].iter().all(|&byte| byte == 0));
        assert_eq!(
            target.table_line(),
            "0 2048 verity 1 254:2 254:3 4096 4096 256 1 sha256 ab 00"
        );
    }

    #[test]
    fn two_targets_chain_through_next() {
        let target = |start, params: &str| Target {
            start_sector: start,
            length_sectors: 8,
            target_type: "linear".into(),
            params: params.into(),
        };
        let buffer =
            table_load_buffer("t", 0, &[target(0, "8:1 0"), target(8, "8:2 100")]).unwrap();
        let first = &buffer[312..];
        let next = u32::from_ne_bytes(first[20..24].try_into().unwrap()) as usize;
        assert_eq!(next, 48);
        let second = &first[next..];
        assert_eq!(&second[0..8], &8u64.to_ne_bytes());
        assert_eq!(&second[40..47], b"8:2 100");
        assert_eq!(buffer.len(), 312 + 48 + 48);
    }

    #[test]
    fn bad_names_and_types_are_refused() {
        assert!(matches!(
            simple_buffer(&"x".repeat(128), 0),
            Err(BufferError::BadName(_))
        ));
        assert!(matches!(
            simple_buffer("a/b", 0),
            Err(BufferError::BadName(_))
        ));
        let target = Target {
            start_sector: 0,
            length_sectors: 1,
            target_type: "a-very-long-target-name".into(),
            params: String::new(),
        };
        assert!(matches!(
            table_load_buffer("t", 0, &[target]),
            Err(BufferError::BadTargetType(_))
        ));
    }

    #[test]
    fn device_numbers_decode_like_the_kernel_encodes_them() {
        // huge_encode_dev(MKDEV(254, 0)) and MKDEV(254, 300).
        assert_eq!(
            DeviceNumber::from_huge_encoded(254 << 8),
            DeviceNumber {
                major: 254,
                minor: 0
            }
        );
        let encoded = (300 & 0xff) | (254 << 8) | ((300 & !0xff) << 12);
        assert_eq!(
            DeviceNumber::from_huge_encoded(encoded),
            DeviceNumber {
                major: 254,
                minor: 300
            }
        );
        assert_eq!(DeviceNumber { major: 8, minor: 3 }.to_string(), "8:3");
    }
}
