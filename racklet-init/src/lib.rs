//! `racklet-init`: the `/init` of the initramfs inside each slot's Unified
//! Kernel Image.
//!
//! It mounts the API file systems, reads the slot and its dm-verity root hash
//! from the kernel command line, loads the kernel modules the image builder
//! listed, finds the slot's root and verity partitions by their PARTUUIDs
//! (derived from the root hash), opens a read-only dm-verity device over them,
//! mounts it on `/sysroot`, mounts the data partition of the same disk on
//! `/sysroot/var` with an overlay on `/sysroot/etc` kept there (see `data.rs`),
//! and switches root to the slot's init.
//!
//! Any failure ends in one `racklet-init: FATAL: ...` line on the console and
//! a reboot (see [`fail`]); there is no shell.

pub(crate) mod boot_attempt;
pub(crate) mod console;
pub(crate) mod data;
pub(crate) mod device_mapper;
pub(crate) mod error;
pub(crate) mod execv;
pub(crate) mod factory_reset;
pub(crate) mod modules;
pub(crate) mod partitions;
pub(crate) mod switch_root;
pub(crate) mod sys;
pub(crate) mod verity_root;

use std::convert::Infallible;
use std::fs;
use std::path::Path;
use std::time::Duration;

use os_format::cmdline::BootParams;

pub use error::{Fatal, InitError};

/// The kernel command line.
pub(crate) const PROC_CMDLINE: &str = "/proc/cmdline";
/// How long the fatal line stays on screen before the reboot.
const FATAL_REBOOT_DELAY: Duration = Duration::from_secs(3);

/// Boot the slot named on the kernel command line. Returns only on failure
/// (on success the process has become the root's init).
pub fn run() -> Result<Infallible, Fatal> {
    sys::mount_api_filesystems().map_err(Fatal::early)?;
    if sys::is_pid1() {
        console::ensure_console_fds();
        console::attach_kmsg();
    }

    let cmdline = fs::read_to_string(PROC_CMDLINE).map_err(|source| {
        Fatal::early(InitError::Read {
            path: PROC_CMDLINE.into(),
            source,
        })
    })?;
    let params = BootParams::parse(&cmdline).map_err(Fatal::early)?;
    let slot = params.slot;
    let in_slot = |error| Fatal::in_slot(slot, error);
    let fs_type = verity_root::root_fs_type(&cmdline);

    let summary =
        modules::load_listed_modules(Path::new(modules::MODULE_LIST_PATH)).map_err(in_slot)?;
    for module in &summary.not_for_this_machine {
        info!(
            "{}: not for this machine (ENODEV), skipped",
            module.display()
        );
    }

    let dev_dir = Path::new(os_format::layout::DEV_DIR);
    let sys_block = Path::new(os_format::layout::SYS_BLOCK_DIR);
    let slot_partitions = partitions::wait_for_slot_partitions(
        sys_block,
        dev_dir,
        slot,
        &params.verity_root_hash,
        partitions::PARTITION_WAIT,
    )
    .map_err(|missing| in_slot(InitError::PartitionsNotFound(missing)))?;

    match boot_attempt::check(slot_partitions.esp.as_ref(), dev_dir, slot) {
        Ok(Some(file_name)) => stop(&boot_attempt::stop_message(slot, &file_name)),
        Ok(None) => {}
        Err(message) => warn!("{message}"),
    }

    let verity = verity_root::open_verity_root(
        &slot_partitions,
        &params.verity_root_hash,
        dev_dir,
        sys_block,
    )
    .map_err(in_slot)?;
    verity_root::mount_root(&verity.node, &fs_type).map_err(in_slot)?;
    let new_root = Path::new(verity_root::SYSROOT);
    switch_root::check_init(new_root, &params.init).map_err(in_slot)?;

    let reset =
        factory_reset::requested(slot_partitions.esp.as_ref(), dev_dir).unwrap_or_else(|message| {
            warn!("{message}");
            None
        });
    let mut data_emptied = false;
    let var = data::mount_var_and_etc(
        new_root,
        &slot_partitions.disk,
        &slot_partitions.data,
        dev_dir,
        |var_dir| {
            if reset.is_some() {
                data_emptied = empty_for_factory_reset(var_dir);
            }
        },
    )
    .map_err(in_slot)?;
    if let Some(request) = reset {
        finish_factory_reset(&request, &var, data_emptied);
    }
    let var_summary = match &var {
        data::VarOutcome::Mounted { device } => format!(
            "data {} ({}) on {}, /etc overlay",
            device.name,
            data::DATA_FS_TYPE,
            new_root.join(data::VAR_DIR).display()
        ),
        data::VarOutcome::Skipped(skip) => {
            warn!("{skip}");
            "/var not mounted".to_string()
        }
    };
    info!(
        "slot {slot}: {} loaded; root {} + verity {} -> {} ({fs_type}) on {}; {var_summary}; \
         starting {}",
        plural(summary.loaded + summary.already_loaded, "module"),
        slot_partitions.root.name,
        slot_partitions.verity.name,
        verity.node.display(),
        new_root.display(),
        params.init
    );
    switch_root::switch_root(new_root, &params.init).map_err(in_slot)
}

/// The factory reset's work on the mounted data partition; whether it is
/// empty now.
fn empty_for_factory_reset(var_dir: &Path) -> bool {
    match factory_reset::empty_data_partition(var_dir) {
        Ok(emptied) => {
            info!(
                "factory reset: the data partition is empty ({} removed from {}): this boot is a first boot",
                plural(emptied.entries, "item"),
                var_dir.display()
            );
            true
        }
        Err(error) => {
            warn!(
                "factory reset: emptying {} failed: {error}; booting on, the flag {} stays for the next boot",
                var_dir.display(),
                os_format::settings::FACTORY_RESET_FLAG_ON_ESP
            );
            false
        }
    }
}

/// Remove the ESP's flag once the data partition is empty (or has no file
/// system, so that systemd makes a new one this boot); else keep it.
fn finish_factory_reset(
    request: &factory_reset::ResetRequest,
    var: &data::VarOutcome,
    data_emptied: bool,
) {
    let flag = os_format::settings::FACTORY_RESET_FLAG_ON_ESP;
    let done = data_emptied
        || matches!(
            var,
            data::VarOutcome::Skipped(data::VarSkip::NoFileSystem { .. })
        );
    if !done {
        warn!("factory reset: the data partition was not emptied; the flag {flag} stays for the next boot");
        return;
    }
    match request.clear() {
        Ok(()) => info!("factory reset: {flag} removed from the ESP {}", request.esp),
        Err(error) => warn!(
            "factory reset: cannot remove {flag} from the ESP {}: {error}; the next boot resets again",
            request.esp
        ),
    }
}

/// `n thing` or `n things`.
fn plural(count: usize, thing: &str) -> String {
    if count == 1 {
        format!("{count} {thing}")
    } else {
        format!("{count} {thing}s")
    }
}

/// A boot that must not go on and must not reset either (every slot failed
/// to start): one line on the console, then (as PID 1) nothing, for good;
/// in a test run, exit status 2.
pub(crate) fn stop(message: &str) -> ! {
    console::fatal(&format!("STOPPED: {message}"));
    if !sys::is_pid1() {
        std::process::exit(2);
    }
    rustix::fs::sync();
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

/// The end of a failed boot: one fatal line, then (as PID 1) a reboot after
/// `FATAL_REBOOT_DELAY`, or (in a test run) exit status 1.
pub fn fail(fatal: &Fatal) -> ! {
    if !sys::is_pid1() {
        console::fatal(&format!("{fatal} — exiting"));
        std::process::exit(1);
    }
    console::fatal(&format!("{fatal} — rebooting"));
    std::thread::sleep(FATAL_REBOOT_DELAY);
    rustix::fs::sync();
    // `reboot(2)` with `LINUX_REBOOT_CMD_RESTART` (libc's `RB_AUTOBOOT`);
    // it only returns on failure.
    let _ = rustix::system::reboot(rustix::system::RebootCommand::Restart);
    // Exiting PID 1 panics the kernel, which reboots if `panic=` is set.
    std::process::exit(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reboot_after_a_fatal_error_is_a_restart() {
        // LINUX_REBOOT_CMD_RESTART (linux/reboot.h), which glibc calls RB_AUTOBOOT.
        assert_eq!(rustix::system::RebootCommand::Restart as i32, 0x0123_4567);
    }

    #[test]
    fn plural_counts() {
        assert_eq!(plural(1, "module"), "1 module");
        assert_eq!(plural(12, "module"), "12 modules");
    }
}
