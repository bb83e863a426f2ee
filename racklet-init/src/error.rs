//! Everything that can stop `/init` from reaching the root's init.
//!
//! Every variant names the file, device or value it is about, because the
//! message is all an operator sees on the console before the machine reboots.

use std::fmt;
use std::io;
use std::path::PathBuf;

use os_format::cmdline::CmdlineError;
use os_format::layout::Slot;
use os_format::verity::VerityError;
use rustix::io::Errno;
use thiserror::Error;

use crate::partitions::MissingPartitions;

/// Why `/init` cannot go on.
#[derive(Debug, Error)]
pub enum InitError {
    /// A directory `/init` needs could not be created.
    #[error("cannot create directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An early API file system (devtmpfs, proc, sysfs) could not be mounted.
    #[error("cannot mount {fs_type} on {target}: {source}")]
    MountApiFs {
        fs_type: &'static str,
        target: &'static str,
        #[source]
        source: io::Error,
    },
    /// A file `/init` must read could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The kernel command line lacks or garbles one of our keys.
    #[error("{0}")]
    Cmdline(#[from] CmdlineError),
    /// A line of the module list is not an absolute path to a plain `.ko`.
    #[error("module list {path}, line {line}: {reason}")]
    ModuleList {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    /// A listed module file is not in the initramfs.
    #[error("kernel module {path} is listed but cannot be opened: {source}")]
    ModuleMissing {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The kernel refused a listed module.
    #[error("kernel module {path} failed to load: {source}{hint}", hint = module_error_hint(*source))]
    ModuleLoad {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    /// The slot's root or verity partition never appeared.
    #[error("{0}")]
    PartitionsNotFound(MissingPartitions),
    /// The verity partition does not start with a usable superblock.
    #[error("verity partition {device}: {source}")]
    VeritySuperblock {
        device: PathBuf,
        #[source]
        source: VerityError,
    },
    /// The root partition is smaller than the data the hash tree covers.
    #[error(
        "root partition {device} holds {partition_bytes} bytes but its hash tree covers \
         {data_bytes} bytes"
    )]
    RootPartitionTooSmall {
        device: PathBuf,
        partition_bytes: u64,
        data_bytes: u64,
    },
    /// A device-mapper ioctl failed; the kernel log usually says why.
    #[error("device-mapper {operation} for {name}: {source} (see the kernel log above)")]
    DeviceMapper {
        operation: &'static str,
        name: String,
        #[source]
        source: io::Error,
    },
    /// The device-mapper device was created but its block device did not show up.
    #[error("device-mapper device {name} (dm-{minor}) has no usable node: {reason}")]
    DeviceNode {
        name: String,
        minor: u32,
        reason: String,
    },
    /// The verity device could not be mounted as the root file system.
    #[error("cannot mount {device} ({fs_type}, read-only) on {target}: {source}{hint}",
        hint = mount_error_hint(*source))]
    MountRoot {
        device: PathBuf,
        fs_type: String,
        target: &'static str,
        #[source]
        source: Errno,
    },
    /// The `/etc` overlay on the mounted data partition could not be set up.
    #[error("cannot set up the /etc overlay: {step}: {source}{hint}", hint = overlay_error_hint(source))]
    EtcOverlay {
        step: String,
        #[source]
        source: io::Error,
    },
    /// The program to start on the root is missing or not executable.
    #[error("init {init} on the root: {reason}")]
    InitNotExecutable { init: String, reason: String },
    /// The initramfs does not look like one, so its files are not deleted.
    #[error("refusing to switch root: {reason}")]
    NotAnInitramfs { reason: String },
    /// A step of switching to the new root failed.
    #[error("switching root: {step}: {source}")]
    SwitchRoot {
        step: String,
        #[source]
        source: io::Error,
    },
    /// `execv` of the root's init returned.
    #[error("cannot execute {init} on the new root: {source}")]
    Exec {
        init: String,
        #[source]
        source: io::Error,
    },
    /// A bug: `/init` panicked.
    #[error("internal error: {0}")]
    Internal(String),
}

/// A fatal error together with the slot it happened in, once that is known.
///
/// Displays as the one line printed before rebooting, without the
/// `racklet-init: FATAL: ` prefix.
#[derive(Debug)]
pub struct Fatal {
    /// The slot named on the kernel command line, if it was parsed.
    pub(crate) slot: Option<Slot>,
    /// What went wrong.
    pub(crate) error: InitError,
}

impl Fatal {
    /// A failure before the command line named the slot.
    pub fn early(error: impl Into<InitError>) -> Fatal {
        Fatal {
            slot: None,
            error: error.into(),
        }
    }

    /// A failure while booting `slot`.
    pub(crate) fn in_slot(slot: Slot, error: impl Into<InitError>) -> Fatal {
        Fatal {
            slot: Some(slot),
            error: error.into(),
        }
    }
}

impl fmt::Display for Fatal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.slot {
            Some(slot) => write!(f, "slot {slot}: {}", self.error),
            None => write!(f, "{}", self.error),
        }
    }
}

impl std::error::Error for Fatal {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// A hint for the errors `finit_module` commonly returns.
fn module_error_hint(errno: Errno) -> &'static str {
    match errno {
        Errno::NOENT => {
            " (unknown symbol: a module it needs is missing from the list or listed after it)"
        }
        Errno::NOEXEC => " (not a module for this kernel, or compressed)",
        Errno::KEYREJECTED | Errno::BADMSG => " (signature rejected)",
        _ => "",
    }
}

/// A hint for the errors `mount` of the root commonly returns.
fn mount_error_hint(errno: Errno) -> &'static str {
    match errno {
        Errno::NODEV => " (file system type unknown: is its module in the list?)",
        Errno::IO => " (I/O error: corrupt data or wrong roothash?)",
        Errno::INVAL => " (not a file system of that type: wrong rootfstype= or roothash?)",
        _ => "",
    }
}

/// A hint for the errors setting up the `/etc` overlay commonly returns
/// (creating its directories, or the mount).
fn overlay_error_hint(error: &io::Error) -> &'static str {
    match Errno::from_io_error(error) {
        Some(Errno::NODEV) => " (overlay file system unknown: is overlay in the module list?)",
        Some(Errno::NOENT) => " (the root has no /etc directory?)",
        Some(Errno::ROFS) => " (the data partition is read-only)",
        Some(Errno::INVAL) => " (see the kernel log above)",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fatal_line_names_the_slot_once_known() {
        let error = InitError::InitNotExecutable {
            init: "/sbin/init".into(),
            reason: "missing".into(),
        };
        assert_eq!(
            Fatal::in_slot(Slot::B, error).to_string(),
            "slot b: init /sbin/init on the root: missing"
        );
        let early = Fatal::early(InitError::Internal("boom".into()));
        assert_eq!(early.to_string(), "internal error: boom");
    }

    #[test]
    fn module_errors_carry_a_hint() {
        let error = InitError::ModuleLoad {
            path: "/lib/modules/x/dm-verity.ko".into(),
            source: Errno::NOENT,
        };
        assert_eq!(
            error.to_string(),
            "kernel module /lib/modules/x/dm-verity.ko failed to load: No such file or directory \
             (os error 2) (unknown symbol: a module it needs is missing from the list or listed \
             after it)"
        );
    }

    #[test]
    fn overlay_errors_name_the_step() {
        let error = InitError::EtcOverlay {
            step: "mount overlay (lowerdir=/sysroot/etc,...) on /sysroot/etc".into(),
            source: Errno::NODEV.into(),
        };
        let text = Fatal::in_slot(Slot::A, error).to_string();
        assert!(
            text.starts_with("slot a: cannot set up the /etc overlay: mount overlay ("),
            "{text}"
        );
        assert!(text.ends_with("is overlay in the module list?)"), "{text}");
    }
}
