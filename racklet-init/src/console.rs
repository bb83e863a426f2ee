//! Where `/init` says things: the kernel log for progress, the console for the
//! one fatal line.
//!
//! Progress lines go to `/dev/kmsg` once `/dev` is mounted (so they interleave
//! with the kernel's own messages and reach the console at the kernel's log
//! level), and to stderr before that or when not running as PID 1. The fatal
//! line goes straight to the console (stderr of PID 1 is `/dev/console`), so it
//! shows whatever `loglevel=` says.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::BorrowedFd;
use std::sync::OnceLock;

use rustix::stdio;

/// The kernel log device.
pub(crate) const KMSG_PATH: &str = "/dev/kmsg";
/// The system console device.
pub(crate) const CONSOLE_PATH: &str = "/dev/console";
/// Prefix of every line `/init` writes.
pub(crate) const LOG_PREFIX: &str = "racklet-init: ";
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
pub(crate) fn attach_kmsg() {
    if let Ok(kmsg) = OpenOptions::new().write(true).open(KMSG_PATH) {
        let _ = KMSG.set(kmsg);
    }
}

/// Make sure file descriptors 0, 1 and 2 are open on the console, as the
/// kernel normally arranges for PID 1: the initramfs may lack `/dev/console`
/// at the time the kernel looks for it. The root's init inherits them.
pub(crate) fn ensure_console_fds() {
    let standard_fds = [stdio::stdin(), stdio::stdout(), stdio::stderr()];
    if !standard_fds.into_iter().any(is_closed) {
        return;
    }
    let Ok(console) = OpenOptions::new().read(true).write(true).open(CONSOLE_PATH) else {
        return;
    };
    if is_closed(stdio::stdin()) {
        let _ = stdio::dup2_stdin(&console);
    }
    if is_closed(stdio::stdout()) {
        let _ = stdio::dup2_stdout(&console);
    }
    if is_closed(stdio::stderr()) {
        let _ = stdio::dup2_stderr(&console);
    }
}

/// Whether `fd` is not open: `fcntl(F_GETFD)` fails on it.
fn is_closed(fd: BorrowedFd<'_>) -> bool {
    rustix::io::fcntl_getfd(fd).is_err()
}

/// Write one progress line.
pub(crate) fn info(message: &str) {
    log(KMSG_INFO_PRIORITY, message);
}

/// Write one warning line.
pub(crate) fn warn(message: &str) {
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
pub(crate) fn fatal_line(message: &str) -> String {
    format!("{LOG_PREFIX}FATAL: {message}")
}

/// Print the fatal line once: on stderr (the console for PID 1), or, if that
/// is closed, on `/dev/console`, or failing both in the kernel log.
pub(crate) fn fatal(message: &str) {
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
    use std::os::fd::AsFd;

    #[test]
    fn an_open_descriptor_is_not_closed() {
        let file = tempfile::tempfile().unwrap();
        assert!(!is_closed(file.as_fd()));
    }

    #[test]
    fn fatal_line_has_the_prefix() {
        assert_eq!(
            fatal_line("slot a: boom — rebooting"),
            "racklet-init: FATAL: slot a: boom — rebooting"
        );
    }
}
