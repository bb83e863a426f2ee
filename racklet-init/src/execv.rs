//! `execv(2)` of the root's init: the one libc call left outside
//! [`crate::device_mapper`].
//!
//! rustix has no safe exec: its `execve` (feature `runtime`) takes raw
//! pointers, is `unsafe` and is meant for language runtimes. std's
//! `CommandExt::exec` is safe but is not the same call: it gives SIGPIPE back
//! its default action (std's runtime ignores it, and the root's init inherits
//! it ignored) and goes through `execvp`, which on `ENOEXEC` runs the file with
//! `/bin/sh` instead of failing. So this stays `execv`, by hand.
// The exec of the root's init, by hand (SAFETY comment at the call).
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::ptr;

/// `execv(program, [program])` with the current environment: the process
/// becomes `program` with no arguments but its name. Returns only on
/// failure, with the error.
pub(crate) fn exec_without_arguments(program: &str) -> io::Error {
    let Ok(path) = CString::new(program) else {
        return io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{program:?} contains a NUL byte"),
        );
    };
    let argv = [path.as_ptr(), ptr::null()];
    // SAFETY: `path` is NUL-terminated and `argv` a null-terminated array of
    // NUL-terminated strings; both outlive the call. execv only returns on
    // failure.
    unsafe { libc::execv(path.as_ptr(), argv.as_ptr()) };
    io::Error::last_os_error()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_program_returns_its_error() {
        let error = exec_without_arguments("/nonexistent/racklet/sbin/init");
        assert_eq!(error.kind(), io::ErrorKind::NotFound, "{error}");
    }

    #[test]
    fn a_nul_in_the_path_is_refused_before_the_call() {
        let error = exec_without_arguments("/sbin/in\0it");
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput, "{error}");
        assert!(error.to_string().contains("NUL byte"), "{error}");
    }
}
