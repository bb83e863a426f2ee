//! A boot that systemd-boot started past its last try.
//!
//! systemd-boot counts every boot of our UKIs in their file names (see the
//! update agent's `boot_control::systemd_boot`): a try gets one boot, a
//! committed UKI [`COMMITTED_BOOT_TRIES`] in a row without the agent
//! confirming one. When every entry has used its boots (both slots fail to
//! start, e.g. both roots corrupted), systemd-boot boots one of them anyway,
//! and the machine would reset and come back here forever. So before the
//! root is opened, the ESP is read: when the booted slot's UKI shows a boot
//! past its tries (`racklet-a+0-4.efi`, `racklet-b+0-2.efi`), the boot stops
//! with a console message instead (see [`crate::stop`]). Our U-Boot script
//! stops by itself before it starts such a slot.
//!
//! Nothing here stops a boot on an ESP that cannot be read: counting is then
//! unknown, and the boot goes on.

use std::fs;
use std::path::Path;

use os_format::layout::{Slot, UkiFileName, COMMITTED_BOOT_TRIES, ESP_UKI_DIR};
use rustix::mount::{MountFlags, UnmountFlags};

use crate::factory_reset::mount_esp;
use crate::partitions::BlockDevice;
use crate::sys::NOSUID_NODEV_NOEXEC;

/// The booted slot's UKI in `names` (the files of the ESP's `EFI/Linux`)
/// whose counter says this boot came after its last try.
pub(crate) fn booted_past_its_tries<'a>(
    names: impl IntoIterator<Item = &'a str>,
    slot: Slot,
) -> Option<&'a str> {
    names.into_iter().find(|name| {
        UkiFileName::parse(name).is_some_and(|parsed| {
            parsed.slot == slot
                && parsed
                    .counter
                    .is_some_and(|counter| counter.booted_past_its_tries())
        })
    })
}

/// Read the ESP (mounted read-only by [`mount_esp`] and unmounted
/// again) and return the booted slot's UKI name if this boot came after its
/// last try. `Err` is a message for a warning; the boot goes on.
pub(crate) fn check(
    esp: Option<&BlockDevice>,
    dev_dir: &Path,
    slot: Slot,
) -> Result<Option<String>, String> {
    let Some(esp) = esp else {
        return Err("no ESP on the root's disk: boot counting cannot be read".into());
    };
    let mount_point = mount_esp(
        esp,
        dev_dir,
        MountFlags::RDONLY | NOSUID_NODEV_NOEXEC,
        "read boot counting",
    )?;
    let directory = mount_point.join(ESP_UKI_DIR);
    let names: Result<Vec<String>, _> = fs::read_dir(&directory).map(|entries| {
        entries
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .collect()
    });
    let _ = rustix::mount::unmount(&mount_point, UnmountFlags::empty());
    let names = names
        .map_err(|error| format!("cannot list {} on the ESP: {error}", directory.display()))?;
    Ok(booted_past_its_tries(names.iter().map(String::as_str), slot).map(str::to_string))
}

/// The console message for a boot that is stopped.
pub(crate) fn stop_message(slot: Slot, file_name: &str) -> String {
    format!(
        "no slot can be started: slot {slot}'s UKI {ESP_UKI_DIR}/{file_name} was started after \
         it had used all its boots (a committed slot gets {COMMITTED_BOOT_TRIES} in a row, a try \
         one), which systemd-boot does only when every slot has failed to start. The boot \
         stops here instead of resetting forever. Write a fresh image to the card, or pick an \
         entry by hand in systemd-boot's menu (hold a key at power-on)."
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_boot_past_the_last_try_of_the_booted_slot_stops() {
        let esp = ["racklet-a+0-4.efi", "racklet-b+0-3.efi"];
        assert_eq!(
            booted_past_its_tries(esp, Slot::A),
            Some("racklet-a+0-4.efi")
        );
        assert_eq!(booted_past_its_tries(esp, Slot::B), None);
        // The last try itself, a committed UKI with boots left, an uncounted
        // UKI and a try: all go on.
        for name in [
            "racklet-a+0-3.efi",
            "racklet-a+2-1.efi",
            "racklet-a.efi",
            "racklet-a+0-1.efi",
            "README.txt",
        ] {
            assert_eq!(booted_past_its_tries([name], Slot::A), None, "{name}");
        }
        assert_eq!(
            booted_past_its_tries(["racklet-b+0-2.efi"], Slot::B),
            Some("racklet-b+0-2.efi")
        );
        let message = stop_message(Slot::A, "racklet-a+0-4.efi");
        assert!(message.contains("EFI/Linux/racklet-a+0-4.efi"), "{message}");
        assert!(message.contains("3 in a row"), "{message}");
    }
}
