//! Where `/init` says things: the kernel log for progress, the console for the
//! one fatal line.
//!
//! Progress lines go to `/dev/kmsg` once `/dev` is mounted (so they interleave
//! with the kernel's own messages and reach the console at the kernel's log
//! level), and to stderr before that or when not running as PID 1. The fatal
//! line goes straight to the console (stderr of PID 1 is `/dev/console`), so it
//! shows whatever `loglevel=` says.
// PID 1's syscalls: fcntl/dup2 on the standard descriptors, by hand (SAFETY comments at each call).
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::OnceLock;

/// The kernel log device.
pub const KMSG_PATH: &str = "/dev/kmsg";
/// The system console device.
pub const CONSOLE_PATH: &str = "/dev/console";
/// Prefix of every line `/init` writes.
pub const LOG_PREFIX: &str = "racklet-init: ";
/// `/dev/kmsg` record priority of progress lines (`KERN_INFO`).
const KMSG_INFO_PRIORITY: &str = "<6>";
/// `/dev/kmsg` record priority of warnings (`KERN_WARNING`).
const KMSG_WARNING_PRIORITY: &str = "<4>";
/// `/dev/kmsg` record priority of the fatal line when no console is open (`KERN_CRIT`).
const KMSG_CRIT_PRIORITY: &str = "<2>";

/// The kernel log, once attached.
static KMSG: OnceLock<File> = OnceLock::new();

/// Log a progress line: `racklet-init: <message>`.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => {
        $crate::console::info(&format!($($arg)*))
    };
}

/// Log a warning line: `racklet-init: <message>` (something is missing but
/// the boot goes on).
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => {
        $crate::console::warn(&format!($($arg)*))
    };
}

/// Send later progress lines to the kernel log. Call once `/dev` is mounted;
/// does nothing if `/dev/kmsg` cannot be opened.
pub fn attach_kmsg() {
    if let Ok(kmsg) = OpenOptions::new().write(true).open(KMSG_PATH) {
        let _ = KMSG.set(kmsg);
    }
}

/// Make sure file descriptors 0, 1 and 2 are open on the console, as the
/// kernel normally arranges for PID 1: the initramfs may lack `/dev/console`
/// at the time the kernel looks for it. The root's init inherits them.
pub fn ensure_console_fds() {
    // SAFETY: fcntl(F_GETFD) only queries the descriptor table.
    let closed = |fd: i32| unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1;
    if !(0..=2).any(closed) {
        return;
    }
    let Ok(console) = OpenOptions::new().read(true).write(true).open(CONSOLE_PATH) else {
        return;
    };
    for fd in 0..=2 {
        if closed(fd) {
            // SAFETY: dup2 onto a closed standard descriptor; `console` stays valid.
            unsafe { libc::dup2(console.as_raw_fd(), fd) };
        }
    }
}

/// Write one progress line.
pub fn info(message: &str) {
    log(KMSG_INFO_PRIORITY, message);
}

/// Write one warning line.
pub fn warn(message: &str) {
    log(KMSG_WARNING_PRIORITY, message);
}

/// Write one line to the kernel log at `priority`, or to stderr before it
/// is attached.
fn log(priority: &str, message: &str) {
    if let Some(mut kmsg) = KMSG.get() {
        let record = format!("{priority}{LOG_PREFIX}{message}\n");
        if kmsg.write_all(record.as_bytes()).is_ok() {
            return;
        }
    }
    let _ = std::io::stderr().write_all(format!("{LOG_PREFIX}{message}\n").as_bytes());
}

/// The fatal line as printed: `racklet-init: FATAL: <message>`.
pub fn fatal_line(message: &str) -> String {
    format!("{LOG_PREFIX}FATAL: {message}")
}

/// Print the fatal line once: on stderr (the console for PID 1), or, if that
/// is closed, on `/dev/console`, or failing both in the kernel log.
pub fn fatal(message: &str) {
    let line = format!("{}\n", fatal_line(message));
    if std::io::stderr().write_all(line.as_bytes()).is_ok() {
        return;
    }
    if let Ok(mut console) = OpenOptions::new().write(true).open(CONSOLE_PATH) {
        if console.write_all(line.as_bytes()).is_ok() {
            return;
        }
    }
    if let Some(mut kmsg) = KMSG.get() {
        let _ = kmsg.write_all(format!("{KMSG_CRIT_PRIORITY}{line}").as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fatal_line_has_the_prefix() {
        assert_eq!(
            fatal_line("slot a: boom — rebooting"),
            "racklet-init: FATAL: slot a: boom — rebooting"
        );
    }
}
