//! The agent's slot and operation transitions, as pure functions.
//!
//! Each function takes what the agent knows (its state, what the boot loader
//! says as a [`BootView`], the running image, the time) and returns a
//! [`Transition`]: the new state, and the boot-loader steps that must be done
//! before that state is written. The daemon only carries the steps out, in
//! order ([`carry_out`]), and then writes the state once; if a step fails, the
//! state file stays as it was and the step is repeated next time (every
//! [`BootControl`] method is idempotent). RAUC's plan-then-execute and
//! Bottlerocket's signpost (change the state in memory, write it once) are the
//! models.

use std::path::PathBuf;

use jiff::Timestamp;
use os_format::layout::Slot;
use os_format::update_manifest::Version;

use crate::boot_control::{BootControl, BootControlError, SlotBootState};
use crate::error::AgentError;
use crate::health::HealthReport;
use crate::state::{AgentState, Operation, SlotState};
use crate::status::Booted;

/// One boot-loader step of a transition: a [`BootControl`] method.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootAction {
    MarkUnbootable(Slot),
    /// Place this verified UKI as the slot's, with one boot try.
    PlaceTry {
        slot: Slot,
        uki: PathBuf,
    },
    Commit(Slot),
    MarkBad(Slot),
    SwitchTo(Slot),
    /// The committed slot failed to start and the booted one runs instead.
    FallBackFrom(Slot),
}

/// The new state and the boot-loader steps that come before it is written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub state: AgentState,
    pub actions: Vec<BootAction>,
}

impl Transition {
    fn to(state: AgentState) -> Transition {
        Transition {
            state,
            actions: Vec::new(),
        }
    }
}

/// Carry out a transition's boot-loader steps, in order, stopping at the
/// first that fails.
pub fn carry_out(
    boot: &mut dyn BootControl,
    actions: &[BootAction],
) -> Result<(), BootControlError> {
    for action in actions {
        match action {
            BootAction::MarkUnbootable(slot) => boot.mark_unbootable(*slot)?,
            BootAction::PlaceTry { slot, uki } => boot.set_one_try(*slot, uki)?,
            BootAction::Commit(slot) => boot.commit(*slot)?,
            BootAction::MarkBad(slot) => boot.mark_bad(*slot)?,
            BootAction::SwitchTo(slot) => boot.switch_to(*slot)?,
            BootAction::FallBackFrom(slot) => boot.fall_back_from(*slot)?,
        }
    }
    Ok(())
}

/// What the boot loader says, read once for a decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootView {
    /// Each slot's state on the ESP, A first.
    pub slot_states: [(Slot, SlotBootState); 2],
    /// Is this boot (of the booted slot) a try that has not been committed?
    pub booted_is_trying: bool,
    /// The slot the boot loader starts next (`None`: nothing bootable).
    pub next_boot: Option<Slot>,
}

impl BootView {
    pub fn read(boot: &dyn BootControl, booted: Slot) -> Result<BootView, BootControlError> {
        Ok(BootView {
            slot_states: boot.slot_states()?,
            booted_is_trying: boot.is_trying(booted)?,
            next_boot: boot.next_boot()?,
        })
    }

    pub fn state_of(&self, slot: Slot) -> SlotBootState {
        self.slot_states
            .iter()
            .find(|(each, _)| *each == slot)
            .map_or(SlotBootState::Absent, |(_, state)| *state)
    }
}

/// What a slot without a record holds, in the boot loader's word (a first
/// start, or a state file rebuilt).
pub fn slot_state_from_boot_loader(boot_state: SlotBootState) -> SlotState {
    match boot_state {
        SlotBootState::Absent => SlotState::Empty,
        // Never to be booted, or tried and not running: failed.
        SlotBootState::Bad
        | SlotBootState::FailedToStart
        | SlotBootState::Trying { tries_left: 0 } => SlotState::Bad,
        // A try placed and not taken yet: the next boot tries it.
        SlotBootState::Trying { .. } => SlotState::Installed,
        SlotBootState::Good => SlotState::Good,
    }
}

/// The result of [`reconcile`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reconciled {
    pub transition: Transition,
    /// This boot is a try: the health gate decides it.
    pub run_health_gate: bool,
}

/// After a (re)start of the agent: an interrupted write, a try that did not
/// come back, an update waiting for a reboot the boot loader would not do, or
/// this boot being a try.
pub fn reconcile(
    state: &AgentState,
    boot: &BootView,
    running: &Booted,
    now: Timestamp,
) -> Reconciled {
    let booted = running.slot;
    let other = booted.other();
    let mut next = state.clone();
    let mut actions = Vec::new();
    // What the image shipped with: the booted slot's record.
    if next.slot(booted).state == SlotState::Unknown {
        let record = next.slot_mut(booted);
        record.state = SlotState::Good;
        record.version = Some(running.version.clone());
        record.verity_root_hash = Some(running.verity_root_hash.clone());
    }
    if next.slot(other).state == SlotState::Unknown {
        next.slot_mut(other).state = slot_state_from_boot_loader(boot.state_of(other));
    }
    let trying = boot.booted_is_trying;
    if !trying && boot.state_of(other) == SlotBootState::FailedToStart {
        fall_back_from(&mut next, &mut actions, state, running, now);
    }
    let was_trying = matches!(state.operation, Operation::Trying { .. });
    let was_installed = matches!(state.operation, Operation::Installed { .. });
    let interrupted_name = state.operation.name();
    match state.operation.clone() {
        // The install got as far as placing the try before the state file
        // said so, and this is that try.
        Operation::Writing { version, slot, .. } | Operation::Verifying { version, slot }
            if slot == booted && trying && version == running.version =>
        {
            next.operation = Operation::Trying { version, slot };
            next.slot_mut(slot).state = SlotState::Trying;
        }
        Operation::Writing { version, slot, .. } | Operation::Verifying { version, slot } => {
            // Interrupted (power cut, crash): the slot was unbootable all along.
            actions.push(BootAction::MarkUnbootable(slot));
            next.slot_mut(slot).state = SlotState::Unbootable;
            next.operation = Operation::Idle;
            next.record_error(
                now,
                interrupted_name,
                format!(
                    "installing {version} into slot {slot} was interrupted; it will start again"
                ),
            );
        }
        Operation::Installed { version, slot } | Operation::Trying { version, slot }
            if slot != booted =>
        {
            // A try used up. `Bad` counts only for a try in progress: an
            // installed update whose last boot-loader write was lost can look
            // bad (U-Boot's state from before the install), and that is not
            // a failed boot.
            let used = match boot.state_of(slot) {
                SlotBootState::Trying { tries_left: 0 } => true,
                SlotBootState::Bad => was_trying,
                _ => false,
            };
            if used || was_trying {
                // The try happened and the boot loader fell back: a crash, a
                // failed boot or a power cut before the health gate. One more
                // automatic attempt (a power cut is not the image's fault);
                // the second time the version is recorded as failed.
                actions.push(BootAction::MarkBad(slot));
                if state.interrupted_tries.contains(&version) {
                    next.slot_mut(slot).state = SlotState::Bad;
                    next.record_failed_version(
                        version.clone(),
                        "did not come up in its boot try, twice (the boot loader fell back)",
                        now,
                    );
                    next.update_failures_total += 1;
                } else {
                    next.slot_mut(slot).state = SlotState::Unbootable;
                    next.interrupted_tries.push(version.clone());
                    next.record_error(
                        now,
                        "trying",
                        format!("{version} did not come up in its boot try in slot {slot} (the boot loader fell back); it will be installed once more"),
                    );
                }
                next.operation = Operation::Idle;
            } else if was_installed
                && matches!(boot.next_boot, Some(next_slot) if next_slot != slot)
            {
                // Installed, but the boot loader would not try it: its entry
                // did not outlive a power cut. Never leave an update waiting
                // for a reboot that would not start it.
                actions.push(BootAction::MarkUnbootable(slot));
                next.slot_mut(slot).state = SlotState::Unbootable;
                next.operation = Operation::Idle;
                next.record_error(
                    now,
                    "installed",
                    format!("{version} was installed in slot {slot}, but after a restart the boot loader would not try it (its entry did not reach the disk); it will be installed again"),
                );
            }
        }
        Operation::Installed { version, slot } | Operation::Trying { version, slot } => {
            if trying {
                next.operation = Operation::Trying { version, slot };
                next.slot_mut(slot).state = SlotState::Trying;
            } else {
                // Committed already (by hand or before a restart).
                next.operation = Operation::Idle;
                next.slot_mut(slot).state = SlotState::Good;
            }
        }
        Operation::Idle => {
            if trying {
                next.operation = Operation::Trying {
                    version: running.version.clone(),
                    slot: booted,
                };
                next.slot_mut(booted).state = SlotState::Trying;
            }
        }
    }
    Reconciled {
        transition: Transition {
            state: next,
            actions,
        },
        run_health_gate: trying,
    }
}

/// The committed slot (the other one) failed to start
/// [`COMMITTED_BOOT_TRIES`](os_format::layout::COMMITTED_BOOT_TRIES) times
/// in a row and the boot loader started the booted slot: the booted slot
/// becomes the committed one, the failed slot is never started again
/// automatically and is recorded as waiting for its repair (the next install
/// goes into it, see `policy::decide`'s `repair`).
fn fall_back_from(
    next: &mut AgentState,
    actions: &mut Vec<BootAction>,
    state: &AgentState,
    running: &Booted,
    now: Timestamp,
) {
    let failed = running.slot.other();
    let version = match state.slot(failed).state {
        SlotState::Good | SlotState::Unknown => state.slot(failed).version.clone(),
        _ => None,
    };
    actions.push(BootAction::FallBackFrom(failed));
    next.slot_mut(failed).state = SlotState::Bad;
    next.slot_start_failures_total += 1;
    next.failed_slot = Some(crate::state::FailedSlot {
        slot: failed,
        version: version.clone(),
        time: now,
    });
    let held = version.map_or_else(String::new, |version| format!(" ({version})"));
    next.record_error(
        now,
        "boot",
        format!(
            "committed slot {failed}{held} failed to start {} times in a row (a corrupted root or a kernel that does not come up); the boot loader fell back to slot {} ({}), which is committed now; slot {failed} is repaired by the next install",
            os_format::layout::COMMITTED_BOOT_TRIES,
            running.slot,
            running.version
        ),
    );
}

/// May an install start now? `busy`: one is running in the background.
pub fn may_start_install(state: &AgentState, busy: bool) -> Result<(), AgentError> {
    match &state.operation {
        _ if busy => Err(AgentError::Busy {
            operation: state.operation.name().into(),
        }),
        Operation::Idle => Ok(()),
        Operation::Installed { version, slot } => Err(AgentError::Busy {
            operation: format!(
                "{version} is installed in slot {slot} and waits for a reboot (cancel it first)"
            ),
        }),
        other => Err(AgentError::Busy {
            operation: other.name().into(),
        }),
    }
}

/// Step 1 of an install: nothing may boot `slot` while it is written.
pub fn begin_install(state: &AgentState, slot: Slot, version: &Version, total: u64) -> Transition {
    let mut next = state.clone();
    let record = next.slot_mut(slot);
    record.state = SlotState::Unbootable;
    record.version = None;
    record.verity_root_hash = None;
    next.operation = Operation::Writing {
        version: version.clone(),
        slot,
        bytes_written: 0,
        total,
    };
    next.clear_error();
    Transition {
        state: next,
        actions: vec![BootAction::MarkUnbootable(slot)],
    }
}

/// Step 3 of an install: what was written is read back and checked.
pub fn verify_install(state: &AgentState, slot: Slot, version: &Version) -> Transition {
    let mut next = state.clone();
    next.operation = Operation::Verifying {
        version: version.clone(),
        slot,
    };
    Transition::to(next)
}

/// The last step of an install: the written and verified slot gets its UKI
/// (`uki`, downloaded and checked) with one boot try.
pub fn finish_install(
    state: &AgentState,
    slot: Slot,
    version: &Version,
    verity_root_hash: &str,
    written_bytes: u64,
    uki: PathBuf,
) -> Transition {
    let mut next = state.clone();
    next.written_bytes_total += written_bytes;
    let record = next.slot_mut(slot);
    record.state = SlotState::Installed;
    record.version = Some(version.clone());
    record.verity_root_hash = Some(verity_root_hash.to_string());
    next.operation = Operation::Installed {
        version: version.clone(),
        slot,
    };
    Transition {
        state: next,
        actions: vec![BootAction::PlaceTry { slot, uki }],
    }
}

/// An install failed at any step: the slot stays unbootable, and the error is
/// recorded against the step it happened in.
pub fn install_failed(
    state: &AgentState,
    slot: Slot,
    version: &Version,
    error: &str,
    now: Timestamp,
) -> Transition {
    let mut next = state.clone();
    let record = next.slot_mut(slot);
    record.state = SlotState::Unbootable;
    record.version = None;
    record.verity_root_hash = None;
    next.update_failures_total += 1;
    next.operation = Operation::Idle;
    next.record_error(
        now,
        state.operation.name(),
        format!("installing {version}: {error}"),
    );
    Transition {
        state: next,
        actions: vec![BootAction::MarkUnbootable(slot)],
    }
}

/// What a cancel does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CancelPlan {
    /// An install is running: tell its writer to stop (the slot stays
    /// unbootable).
    StopTheRunningInstall,
    /// An installed update waits for its reboot: it will not be booted.
    Undo {
        transition: Box<Transition>,
        message: String,
    },
    NothingToCancel,
}

pub fn cancel(state: &AgentState, busy: bool) -> Result<CancelPlan, AgentError> {
    if busy {
        return Ok(CancelPlan::StopTheRunningInstall);
    }
    match &state.operation {
        Operation::Installed { version, slot } => {
            let mut next = state.clone();
            next.slot_mut(*slot).state = SlotState::Unbootable;
            next.operation = Operation::Idle;
            Ok(CancelPlan::Undo {
                transition: Box::new(Transition {
                    state: next,
                    actions: vec![BootAction::MarkUnbootable(*slot)],
                }),
                message: format!("cancelled {version}: slot {slot} will not be booted"),
            })
        }
        Operation::Idle => Ok(CancelPlan::NothingToCancel),
        other => Err(AgentError::Busy {
            operation: other.name().into(),
        }),
    }
}

/// A person's rollback: boot the other slot next, if it holds a committed
/// image. Returns the transition and what it means, for people.
pub fn rollback(
    state: &AgentState,
    boot: &BootView,
    booted: Slot,
    busy: bool,
) -> Result<(Transition, String), AgentError> {
    if busy {
        return Err(AgentError::Busy {
            operation: state.operation.name().into(),
        });
    }
    let other = booted.other();
    let other_boot_state = boot.state_of(other);
    let other_record = state.slot(other);
    if other_boot_state != SlotBootState::Good
        || matches!(
            other_record.state,
            SlotState::Bad | SlotState::Unbootable | SlotState::Empty
        )
    {
        return Err(AgentError::NothingToApply {
            message: format!(
                "slot {other} holds no good image to roll back to (boot loader: {other_boot_state}, agent: {})",
                other_record.state.name()
            ),
        });
    }
    let mut next = state.clone();
    next.operation = Operation::Idle;
    let message = format!(
        "slot {other} ({}) boots next",
        other_record
            .version
            .as_ref()
            .map_or_else(|| "version unknown".to_string(), Version::to_string)
    );
    Ok((
        Transition {
            state: next,
            actions: vec![BootAction::SwitchTo(other)],
        },
        message,
    ))
}

/// The booted image is good (its health gate passed, or a person said so):
/// commit it if it is a try.
pub fn mark_good(state: &AgentState, boot: &BootView, running: &Booted) -> (Transition, String) {
    let slot = running.slot;
    let mut next = state.clone();
    let record = next.slot_mut(slot);
    record.state = SlotState::Good;
    record.version = Some(running.version.clone());
    record.verity_root_hash = Some(running.verity_root_hash.clone());
    next.operation = Operation::Idle;
    next.forget_failed_version(&running.version);
    if next
        .failed_slot
        .as_ref()
        .is_some_and(|failed| failed.slot == slot)
    {
        // The slot that failed to start holds a good version again.
        next.failed_slot = None;
    }
    if boot.booted_is_trying {
        (
            Transition {
                state: next,
                actions: vec![BootAction::Commit(slot)],
            },
            format!("slot {slot} ({}) committed", running.version),
        )
    } else {
        (
            Transition::to(next),
            format!("slot {slot} ({}) was already committed", running.version),
        )
    }
}

/// The booted image is bad (its health gate failed, or a person said so):
/// never boot it again automatically; the caller reboots. A committed slot is
/// marked bad only when the other slot is good to fall back to.
pub fn mark_bad(
    state: &AgentState,
    boot: &BootView,
    running: &Booted,
    reason: &str,
    now: Timestamp,
) -> Result<(Transition, String), AgentError> {
    let slot = running.slot;
    let other = slot.other();
    let mut actions = Vec::new();
    if !boot.booted_is_trying {
        if boot.state_of(other) != SlotBootState::Good {
            return Err(AgentError::NothingToApply {
                message: format!(
                    "slot {other} holds no good image; refusing to mark the only bootable slot bad"
                ),
            });
        }
        actions.push(BootAction::SwitchTo(other));
    }
    actions.push(BootAction::MarkBad(slot));
    let mut next = state.clone();
    next.slot_mut(slot).state = SlotState::Bad;
    next.record_failed_version(running.version.clone(), reason, now);
    next.update_failures_total += 1;
    next.operation = Operation::Idle;
    Ok((
        Transition {
            state: next,
            actions,
        },
        format!(
            "slot {slot} ({}) marked bad: {reason}; slot {other} boots next",
            running.version
        ),
    ))
}

/// The health gate's verdict on this try: commit it or mark it bad (the
/// caller then reboots). `None` when a person decided the try by hand while
/// the gate ran: their call stands.
pub fn health_gate_verdict(
    state: &AgentState,
    boot: &BootView,
    running: &Booted,
    report: &HealthReport,
    now: Timestamp,
) -> Result<Option<(Transition, String)>, AgentError> {
    let still_trying = matches!(&state.operation, Operation::Trying { slot, .. } if *slot == running.slot)
        && state.slot(running.slot).state == SlotState::Trying;
    if !still_trying {
        return Ok(None);
    }
    if report.passed {
        return Ok(Some(mark_good(state, boot, running)));
    }
    let reason = report.reason.as_deref().unwrap_or("health gate failed");
    mark_bad(
        state,
        boot,
        running,
        &format!("health gate failed: {reason}"),
        now,
    )
    .map(Some)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use os_format::layout::Arch;

    use super::*;
    use crate::boot_control::{systemd_boot, uboot, SystemdBoot, UBoot};
    use crate::state::SlotRecord;

    /// Each transition is checked against both boot back ends, driven by the
    /// simulated boot loaders of their own tests.
    #[derive(Clone, Copy, Debug)]
    enum Loader {
        SystemdBoot,
        UBoot,
    }
    const LOADERS: [Loader; 2] = [Loader::SystemdBoot, Loader::UBoot];

    /// A node: its ESP, its boot back end and the agent's state.
    struct Node {
        loader: Loader,
        esp: tempfile::TempDir,
        downloads: tempfile::TempDir,
        boot: Box<dyn BootControl>,
        state: AgentState,
    }

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    fn version(text: &str) -> Version {
        Version::parse(text).unwrap()
    }

    fn running(slot: Slot, text: &str) -> Booted {
        Booted {
            slot,
            version: version(text),
            variant: "test".into(),
            arch: Arch::X86_64,
            verity_root_hash: format!("{text}-root-hash"),
            build_time: 0,
        }
    }

    /// A node that installed 2.0.0 into slot B and booted it for its try.
    fn trying(loader: Loader) -> (Node, Booted) {
        let mut node = Node::fresh(loader);
        node.install("2.0.0");
        assert_eq!(node.power_on(), Some(Slot::B), "{loader:?}");
        let v2 = running(Slot::B, "2.0.0");
        let tried = node.reconcile(&v2);
        assert!(tried.run_health_gate, "{loader:?}");
        node.apply(tried.transition);
        (node, v2)
    }

    impl Node {
        /// A freshly flashed card: slot A committed, slot B empty.
        fn fresh(loader: Loader) -> Node {
            let esp = match loader {
                Loader::SystemdBoot => systemd_boot::simulated::fresh_esp(),
                Loader::UBoot => uboot::simulated::fresh_esp(),
            };
            let boot: Box<dyn BootControl> = match loader {
                Loader::SystemdBoot => Box::new(SystemdBoot::new(esp.path().to_path_buf())),
                Loader::UBoot => Box::new(UBoot::new(esp.path().to_path_buf())),
            };
            let mut node = Node {
                loader,
                esp,
                downloads: tempfile::tempdir().unwrap(),
                boot,
                state: AgentState::default(),
            };
            // The first boot comes up, and the agent starts.
            assert_eq!(node.power_on(), Some(Slot::A), "{loader:?}");
            let first = node.reconcile(&running(Slot::A, "1.0.0"));
            node.apply(first.transition);
            node
        }

        /// A power-on: the slot the boot loader starts (it counts tries on
        /// the ESP as the real one does), and, for a committed slot, its boot
        /// coming up healthy (the agent confirms it; a try is decided by its
        /// own health gate in each test).
        fn power_on(&self) -> Option<Slot> {
            let booted = self.boot_only();
            if let Some(slot) = booted {
                match self.loader {
                    Loader::SystemdBoot => systemd_boot::simulated::came_up(self.esp.path(), slot),
                    Loader::UBoot => uboot::simulated::came_up(self.esp.path(), slot),
                }
            }
            booted
        }

        /// A power-on whose boot never comes up (nothing is confirmed).
        fn boot_only(&self) -> Option<Slot> {
            let esp: &Path = self.esp.path();
            match self.loader {
                Loader::SystemdBoot => systemd_boot::simulated::boot_slot(esp),
                Loader::UBoot => uboot::simulated::boot_script(esp),
            }
        }

        fn view(&self, booted: Slot) -> BootView {
            BootView::read(self.boot.as_ref(), booted).unwrap()
        }

        fn reconcile(&self, running: &Booted) -> Reconciled {
            reconcile(&self.state, &self.view(running.slot), running, now())
        }

        /// The daemon's part: the steps, then the state.
        fn apply(&mut self, step: Transition) {
            carry_out(self.boot.as_mut(), &step.actions).unwrap();
            self.state = step.state;
        }

        /// A verified UKI for `text`, downloaded.
        fn uki(&self, text: &str) -> PathBuf {
            let path = self.downloads.path().join("uki.download");
            std::fs::write(&path, format!("uki {text}")).unwrap();
            path
        }

        /// The agent on slot A starts writing `text` into slot B.
        fn begin_install(&mut self, text: &str) {
            let begin = begin_install(&self.state, Slot::B, &version(text), 100);
            self.apply(begin);
        }

        /// The agent on slot A installs `text` into slot B.
        fn install(&mut self, text: &str) {
            self.begin_install(text);
            let uki = self.uki(text);
            let end = finish_install(
                &self.state,
                Slot::B,
                &version(text),
                &format!("{text}-root-hash"),
                100,
                uki,
            );
            self.apply(end);
        }
    }

    #[test]
    fn slots_without_a_record_take_the_boot_loaders_word() {
        for (boot_state, expected) in [
            (SlotBootState::Absent, SlotState::Empty),
            (SlotBootState::Bad, SlotState::Bad),
            (SlotBootState::Trying { tries_left: 0 }, SlotState::Bad),
            (
                SlotBootState::Trying { tries_left: 1 },
                SlotState::Installed,
            ),
            (SlotBootState::Good, SlotState::Good),
        ] {
            assert_eq!(
                slot_state_from_boot_loader(boot_state),
                expected,
                "{boot_state}"
            );
        }
    }

    #[test]
    fn a_first_start_records_the_running_image_and_an_empty_other_slot() {
        for loader in LOADERS {
            let node = Node::fresh(loader);
            let v1 = running(Slot::A, "1.0.0");
            let reconciled = reconcile(&AgentState::default(), &node.view(Slot::A), &v1, now());
            assert!(!reconciled.run_health_gate, "{loader:?}");
            assert_eq!(reconciled.transition.actions, [], "{loader:?}");
            let state = &reconciled.transition.state;
            assert_eq!(
                state.slot(Slot::A),
                &SlotRecord {
                    state: SlotState::Good,
                    version: Some(version("1.0.0")),
                    verity_root_hash: Some("1.0.0-root-hash".into()),
                },
                "{loader:?}"
            );
            assert_eq!(state.slot(Slot::B).state, SlotState::Empty, "{loader:?}");
            assert_eq!(state.operation, Operation::Idle, "{loader:?}");
            assert_eq!(state.last_error, None, "{loader:?}");
            // Nothing more happens on a second start.
            assert_eq!(
                node.reconcile(&v1).transition.state,
                node.state,
                "{loader:?}"
            );
            assert_eq!(node.power_on(), Some(Slot::A), "{loader:?}");
        }
    }

    #[test]
    fn a_rebuilt_state_sees_a_placed_try_as_installed() {
        for loader in LOADERS {
            let mut node = Node::fresh(loader);
            node.install("2.0.0");
            node.state = AgentState::default();
            let reconciled = node.reconcile(&running(Slot::A, "1.0.0"));
            assert_eq!(reconciled.transition.actions, [], "{loader:?}");
            let state = &reconciled.transition.state;
            assert_eq!(
                state.slot(Slot::B).state,
                SlotState::Installed,
                "{loader:?}"
            );
            assert_eq!(state.slot(Slot::A).state, SlotState::Good, "{loader:?}");
        }
    }

    #[test]
    fn an_interrupted_write_or_verify_leaves_the_slot_unbootable() {
        for loader in LOADERS {
            for verifying in [false, true] {
                let mut node = Node::fresh(loader);
                let begin = begin_install(&node.state, Slot::B, &version("2.0.0"), 100);
                assert_eq!(begin.actions, [BootAction::MarkUnbootable(Slot::B)]);
                node.apply(begin);
                if verifying {
                    node.state.operation = Operation::Verifying {
                        version: version("2.0.0"),
                        slot: Slot::B,
                    };
                }
                // Power cut; the node comes back on slot A.
                assert_eq!(node.power_on(), Some(Slot::A), "{loader:?}");
                let reconciled = node.reconcile(&running(Slot::A, "1.0.0"));
                assert!(!reconciled.run_health_gate);
                assert_eq!(
                    reconciled.transition.actions,
                    [BootAction::MarkUnbootable(Slot::B)],
                    "{loader:?}"
                );
                let state = &reconciled.transition.state;
                assert_eq!(state.operation, Operation::Idle);
                assert_eq!(state.slot(Slot::B).state, SlotState::Unbootable);
                let error = state.last_error.as_ref().unwrap();
                assert_eq!(
                    error.operation,
                    if verifying { "verifying" } else { "writing" }
                );
                assert_eq!(
                    error.message,
                    "installing 2.0.0 into slot b was interrupted; it will start again"
                );
                node.apply(reconciled.transition);
                assert_eq!(node.power_on(), Some(Slot::A), "{loader:?}");
                assert_eq!(node.view(Slot::A).next_boot, Some(Slot::A), "{loader:?}");
            }
        }
    }

    #[test]
    fn a_try_placed_before_the_state_said_so_is_this_boots_try() {
        for loader in LOADERS {
            let mut node = Node::fresh(loader);
            node.install("2.0.0");
            // The state file still said "writing" when the power went.
            node.state.operation = Operation::Writing {
                version: version("2.0.0"),
                slot: Slot::B,
                bytes_written: 100,
                total: 100,
            };
            assert_eq!(node.power_on(), Some(Slot::B), "{loader:?}");
            let reconciled = node.reconcile(&running(Slot::B, "2.0.0"));
            assert!(reconciled.run_health_gate, "{loader:?}");
            assert_eq!(reconciled.transition.actions, [], "{loader:?}");
            let state = &reconciled.transition.state;
            assert_eq!(
                state.operation,
                Operation::Trying {
                    version: version("2.0.0"),
                    slot: Slot::B
                }
            );
            assert_eq!(state.slot(Slot::B).state, SlotState::Trying);
        }
    }

    #[test]
    fn an_installed_update_waits_for_its_reboot() {
        for loader in LOADERS {
            let mut node = Node::fresh(loader);
            node.install("2.0.0");
            assert_eq!(node.view(Slot::A).next_boot, Some(Slot::B), "{loader:?}");
            // The agent restarts before the reboot: nothing changes.
            let reconciled = node.reconcile(&running(Slot::A, "1.0.0"));
            assert!(!reconciled.run_health_gate);
            assert_eq!(
                reconciled.transition,
                Transition::to(node.state.clone()),
                "{loader:?}"
            );
        }
    }

    #[test]
    fn an_installed_update_the_boot_loader_lost_is_installed_again() {
        for loader in LOADERS {
            let mut node = Node::fresh(loader);
            node.begin_install("2.0.0");
            // The state says installed; the try's boot-loader write was lost.
            let uki = node.uki("2.0.0");
            let end = finish_install(&node.state, Slot::B, &version("2.0.0"), "h", 100, uki);
            node.state = end.state;
            let reconciled = node.reconcile(&running(Slot::A, "1.0.0"));
            assert_eq!(
                reconciled.transition.actions,
                [BootAction::MarkUnbootable(Slot::B)],
                "{loader:?}"
            );
            let state = &reconciled.transition.state;
            assert_eq!(state.operation, Operation::Idle);
            assert_eq!(state.slot(Slot::B).state, SlotState::Unbootable);
            assert_eq!(state.last_error.as_ref().unwrap().operation, "installed");
            assert!(state.failed_versions.is_empty(), "not a failed boot");
            node.apply(reconciled.transition);
            assert_eq!(node.power_on(), Some(Slot::A), "{loader:?}");
        }
    }

    #[test]
    fn a_booted_update_is_a_try_and_its_health_gate_commits_it() {
        for loader in LOADERS {
            let mut node = Node::fresh(loader);
            node.install("2.0.0");
            assert_eq!(node.power_on(), Some(Slot::B), "{loader:?}");
            let v2 = running(Slot::B, "2.0.0");
            let reconciled = node.reconcile(&v2);
            assert!(reconciled.run_health_gate, "{loader:?}");
            assert_eq!(reconciled.transition.actions, []);
            assert_eq!(
                reconciled.transition.state.operation,
                Operation::Trying {
                    version: version("2.0.0"),
                    slot: Slot::B
                }
            );
            node.apply(reconciled.transition);
            node.state
                .record_failed_version(version("2.0.0"), "an earlier try", now());

            let (step, message) = mark_good(&node.state, &node.view(Slot::B), &v2);
            assert_eq!(step.actions, [BootAction::Commit(Slot::B)], "{loader:?}");
            assert_eq!(message, "slot b (2.0.0) committed");
            assert!(
                step.state.failed_versions.is_empty(),
                "a passed retry is forgotten"
            );
            node.apply(step);
            assert_eq!(node.state.slot(Slot::B).state, SlotState::Good);
            assert_eq!(node.state.operation, Operation::Idle);
            assert_eq!(node.power_on(), Some(Slot::B), "{loader:?}");
            assert_eq!(node.power_on(), Some(Slot::B), "{loader:?}");

            // Marking good again changes nothing on the ESP.
            let (again, message) = mark_good(&node.state, &node.view(Slot::B), &v2);
            assert_eq!(again.actions, []);
            assert_eq!(message, "slot b (2.0.0) was already committed");
        }
    }

    #[test]
    fn a_committed_slot_that_fails_to_start_is_given_up_then_repaired() {
        for loader in LOADERS {
            // Two good slots: A holds 1.0.0, B the committed 2.0.0.
            let (mut node, v2) = trying(loader);
            let (step, _) = mark_good(&node.state, &node.view(Slot::B), &v2);
            node.apply(step);
            assert_eq!(node.power_on(), Some(Slot::B), "{loader:?}");
            // B's root is corrupted: its boots never come up.
            for boot in 1..=os_format::layout::COMMITTED_BOOT_TRIES {
                assert_eq!(node.boot_only(), Some(Slot::B), "{loader:?} boot {boot}");
            }
            assert_eq!(
                node.view(Slot::A).state_of(Slot::B),
                SlotBootState::FailedToStart,
                "{loader:?}"
            );
            // The next boot is A's good version, without anybody's help.
            assert_eq!(node.boot_only(), Some(Slot::A), "{loader:?}");
            let v1 = running(Slot::A, "1.0.0");
            let reconciled = node.reconcile(&v1);
            assert!(!reconciled.run_health_gate, "{loader:?}");
            assert_eq!(
                reconciled.transition.actions,
                [BootAction::FallBackFrom(Slot::B)],
                "{loader:?}"
            );
            let state = &reconciled.transition.state;
            assert_eq!(state.slot(Slot::B).state, SlotState::Bad);
            assert_eq!(state.slot_start_failures_total, 1);
            let failed = state.failed_slot.as_ref().unwrap();
            assert_eq!(
                (failed.slot, failed.version.clone()),
                (Slot::B, Some(version("2.0.0")))
            );
            let error = state.last_error.as_ref().unwrap();
            assert_eq!(error.operation, "boot");
            assert!(
                error
                    .message
                    .starts_with("committed slot b (2.0.0) failed to start 3 times in a row"),
                "{}",
                error.message
            );
            node.apply(reconciled.transition);
            assert_eq!(
                node.view(Slot::A).slot_states,
                [
                    (Slot::A, SlotBootState::Good),
                    (Slot::B, SlotBootState::Bad)
                ]
                .map(|(slot, state)| (
                    slot,
                    if loader_removes_bad(loader) && slot == Slot::B {
                        SlotBootState::Absent
                    } else {
                        state
                    }
                )),
                "{loader:?}"
            );
            // A again reconciled: nothing more to do, and B is never started.
            assert_eq!(node.reconcile(&v1).transition.actions, [], "{loader:?}");
            for _ in 0..4 {
                assert_eq!(node.power_on(), Some(Slot::A), "{loader:?}");
            }

            // The repair: 2.0.0 installed into B again, tried, committed.
            node.install("2.0.0");
            assert_eq!(node.power_on(), Some(Slot::B), "{loader:?}");
            let tried = node.reconcile(&v2);
            assert!(tried.run_health_gate, "{loader:?}");
            node.apply(tried.transition);
            let (step, _) = mark_good(&node.state, &node.view(Slot::B), &v2);
            assert_eq!(step.state.failed_slot, None, "{loader:?}");
            node.apply(step);
            assert_eq!(
                node.view(Slot::B).slot_states,
                [
                    (Slot::A, SlotBootState::Good),
                    (Slot::B, SlotBootState::Good)
                ],
                "{loader:?}"
            );
            assert_eq!(node.power_on(), Some(Slot::B), "{loader:?}");
        }
    }

    #[test]
    fn when_both_slots_fail_to_start_nothing_is_started_again() {
        for loader in LOADERS {
            let (mut node, v2) = trying(loader);
            let (step, _) = mark_good(&node.state, &node.view(Slot::B), &v2);
            node.apply(step);
            let tries = os_format::layout::COMMITTED_BOOT_TRIES;
            for _ in 0..tries {
                assert_eq!(node.boot_only(), Some(Slot::B), "{loader:?}");
            }
            for _ in 0..tries {
                assert_eq!(node.boot_only(), Some(Slot::A), "{loader:?}");
            }
            match loader {
                // The script stops.
                Loader::UBoot => assert_eq!(node.boot_only(), None),
                // Only used-up entries are left: systemd-boot boots one of
                // them (by version), renamed `+0-4`, which racklet-init
                // recognizes as a boot past its tries and stops.
                Loader::SystemdBoot => {
                    let choice = systemd_boot::simulated::boot(node.esp.path()).unwrap_err();
                    assert!(
                        choice.contains("racklet-a+0-3.efi")
                            && choice.contains("racklet-b+0-3.efi"),
                        "{choice}"
                    );
                }
            }
        }
    }

    /// systemd-boot's back end removes a bad slot's UKI; U-Boot's keeps it.
    fn loader_removes_bad(loader: Loader) -> bool {
        matches!(loader, Loader::SystemdBoot)
    }

    #[test]
    fn a_try_that_does_not_come_back_is_retried_once_then_recorded_as_failed() {
        for loader in LOADERS {
            let mut node = Node::fresh(loader);
            let v1 = running(Slot::A, "1.0.0");
            for attempt in 1..=2 {
                node.install("2.0.0");
                assert_eq!(node.power_on(), Some(Slot::B), "{loader:?}");
                let tried = node.reconcile(&running(Slot::B, "2.0.0"));
                node.apply(tried.transition);
                // The try dies before its health gate; the boot loader falls back.
                assert_eq!(
                    node.power_on(),
                    Some(Slot::A),
                    "{loader:?} attempt {attempt}"
                );
                let reconciled = node.reconcile(&v1);
                assert_eq!(
                    reconciled.transition.actions,
                    [BootAction::MarkBad(Slot::B)],
                    "{loader:?} attempt {attempt}"
                );
                let state = &reconciled.transition.state;
                assert_eq!(state.operation, Operation::Idle);
                if attempt == 1 {
                    assert_eq!(state.slot(Slot::B).state, SlotState::Unbootable);
                    assert_eq!(state.interrupted_tries, [version("2.0.0")]);
                    assert!(state.failed_versions.is_empty());
                    assert_eq!(state.last_error.as_ref().unwrap().operation, "trying");
                } else {
                    assert_eq!(state.slot(Slot::B).state, SlotState::Bad);
                    assert_eq!(state.failed_versions.len(), 1);
                    assert_eq!(state.failed_versions[0].version, version("2.0.0"));
                    assert_eq!(state.update_failures_total, 1);
                }
                node.apply(reconciled.transition);
                assert_eq!(node.power_on(), Some(Slot::A), "{loader:?}");
                assert_eq!(node.power_on(), Some(Slot::A), "{loader:?}");
            }
        }
    }

    #[test]
    fn a_try_used_while_the_agent_never_ran_counts_as_a_try() {
        for loader in LOADERS {
            let mut node = Node::fresh(loader);
            node.install("2.0.0");
            assert_eq!(node.power_on(), Some(Slot::B), "{loader:?}");
            // The try's kernel never reached the agent; the boot loader falls back.
            assert_eq!(node.power_on(), Some(Slot::A), "{loader:?}");
            let reconciled = node.reconcile(&running(Slot::A, "1.0.0"));
            assert_eq!(
                reconciled.transition.actions,
                [BootAction::MarkBad(Slot::B)],
                "{loader:?}: B is {}",
                node.view(Slot::A).state_of(Slot::B)
            );
            assert_eq!(
                reconciled.transition.state.slot(Slot::B).state,
                SlotState::Unbootable
            );
            assert_eq!(
                reconciled.transition.state.interrupted_tries,
                [version("2.0.0")]
            );
        }
    }

    #[test]
    fn a_try_committed_before_a_restart_is_good() {
        for loader in LOADERS {
            let (mut node, v2) = trying(loader);
            // Committed on the ESP; the state file's write was lost.
            node.boot.commit(Slot::B).unwrap();
            let reconciled = node.reconcile(&v2);
            assert!(!reconciled.run_health_gate, "{loader:?}");
            assert_eq!(reconciled.transition.actions, []);
            assert_eq!(reconciled.transition.state.operation, Operation::Idle);
            assert_eq!(
                reconciled.transition.state.slot(Slot::B).state,
                SlotState::Good
            );
        }
    }

    #[test]
    fn a_try_found_with_a_rebuilt_state_is_a_try() {
        for loader in LOADERS {
            let mut node = Node::fresh(loader);
            node.install("2.0.0");
            assert_eq!(node.power_on(), Some(Slot::B));
            node.state = AgentState::default();
            let reconciled = node.reconcile(&running(Slot::B, "2.0.0"));
            assert!(reconciled.run_health_gate, "{loader:?}");
            let state = &reconciled.transition.state;
            assert_eq!(
                state.operation,
                Operation::Trying {
                    version: version("2.0.0"),
                    slot: Slot::B
                }
            );
            assert_eq!(state.slot(Slot::B).state, SlotState::Trying);
            assert_eq!(state.slot(Slot::B).version, Some(version("2.0.0")));
            assert_eq!(state.slot(Slot::A).state, SlotState::Good, "{loader:?}");
        }
    }

    #[test]
    fn a_failed_health_gate_marks_the_try_bad_and_the_old_slot_boots() {
        for loader in LOADERS {
            let (mut node, v2) = trying(loader);
            let (step, message) = mark_bad(
                &node.state,
                &node.view(Slot::B),
                &v2,
                "health gate failed: k3s.service failed",
                now(),
            )
            .unwrap();
            assert_eq!(step.actions, [BootAction::MarkBad(Slot::B)], "{loader:?}");
            assert_eq!(
                message,
                "slot b (2.0.0) marked bad: health gate failed: k3s.service failed; slot a boots next"
            );
            assert_eq!(step.state.slot(Slot::B).state, SlotState::Bad);
            assert_eq!(step.state.failed_versions[0].time, now());
            assert_eq!(step.state.update_failures_total, 1);
            node.apply(step);
            assert_eq!(node.power_on(), Some(Slot::A), "{loader:?}");
            assert_eq!(node.power_on(), Some(Slot::A), "{loader:?}");
        }
    }

    /// A node running 2.0.0 committed in slot B, with 1.0.0 good in slot A.
    fn two_good_slots(loader: Loader) -> Node {
        let (mut node, v2) = trying(loader);
        let (step, _) = mark_good(&node.state, &node.view(Slot::B), &v2);
        node.apply(step);
        node
    }

    #[test]
    fn a_committed_slot_is_marked_bad_only_with_a_good_one_to_fall_back_to() {
        for loader in LOADERS {
            let mut node = two_good_slots(loader);
            let v2 = running(Slot::B, "2.0.0");
            let (step, _) =
                mark_bad(&node.state, &node.view(Slot::B), &v2, "by hand", now()).unwrap();
            assert_eq!(
                step.actions,
                [BootAction::SwitchTo(Slot::A), BootAction::MarkBad(Slot::B)],
                "{loader:?}"
            );
            node.apply(step);
            assert_eq!(node.power_on(), Some(Slot::A), "{loader:?}");

            let fresh = Node::fresh(loader);
            let error = mark_bad(
                &fresh.state,
                &fresh.view(Slot::A),
                &running(Slot::A, "1.0.0"),
                "by hand",
                now(),
            )
            .unwrap_err();
            assert_eq!(
                error.to_string(),
                "nothing to do: slot b holds no good image; refusing to mark the only bootable slot bad"
            );
        }
    }

    #[test]
    fn a_rollback_boots_the_other_good_slot_and_is_refused_otherwise() {
        for loader in LOADERS {
            let mut node = two_good_slots(loader);
            let view = node.view(Slot::B);
            let busy = rollback(&node.state, &view, Slot::B, true).unwrap_err();
            assert!(matches!(busy, AgentError::Busy { .. }), "{busy}");
            let (step, message) = rollback(&node.state, &view, Slot::B, false).unwrap();
            assert_eq!(step.actions, [BootAction::SwitchTo(Slot::A)], "{loader:?}");
            assert_eq!(message, "slot a (1.0.0) boots next");
            node.apply(step);
            assert_eq!(node.power_on(), Some(Slot::A), "{loader:?}");

            // The agent knows slot A's image failed: no rollback to it.
            let mut node = two_good_slots(loader);
            node.state.slot_mut(Slot::A).state = SlotState::Bad;
            let error = rollback(&node.state, &node.view(Slot::B), Slot::B, false).unwrap_err();
            assert_eq!(
                error.to_string(),
                "nothing to do: slot a holds no good image to roll back to (boot loader: good, agent: bad)"
            );

            let fresh = Node::fresh(loader);
            let error = rollback(&fresh.state, &fresh.view(Slot::A), Slot::A, false).unwrap_err();
            assert!(
                error
                    .to_string()
                    .contains("(boot loader: absent, agent: empty)"),
                "{loader:?}: {error}"
            );
        }
    }

    #[test]
    fn a_cancel_stops_the_write_or_undoes_the_waiting_update() {
        for loader in LOADERS {
            let mut node = Node::fresh(loader);
            assert_eq!(
                cancel(&node.state, false).unwrap(),
                CancelPlan::NothingToCancel
            );
            node.install("2.0.0");
            assert_eq!(
                cancel(&node.state, true).unwrap(),
                CancelPlan::StopTheRunningInstall
            );
            let CancelPlan::Undo {
                transition,
                message,
            } = cancel(&node.state, false).unwrap()
            else {
                panic!("an installed update is undone");
            };
            assert_eq!(transition.actions, [BootAction::MarkUnbootable(Slot::B)]);
            assert_eq!(message, "cancelled 2.0.0: slot b will not be booted");
            node.apply(*transition);
            assert_eq!(node.state.operation, Operation::Idle);
            assert_eq!(node.state.slot(Slot::B).state, SlotState::Unbootable);
            assert_eq!(node.power_on(), Some(Slot::A), "{loader:?}");

            node.state.operation = Operation::Verifying {
                version: version("2.0.0"),
                slot: Slot::B,
            };
            let error = cancel(&node.state, false).unwrap_err();
            assert_eq!(error.to_string(), "busy: verifying");
        }
    }

    #[test]
    fn an_install_starts_only_from_idle() {
        let v2 = version("2.0.0");
        for (operation, busy, expected) in [
            (Operation::Idle, false, None),
            (Operation::Idle, true, Some("busy: idle")),
            (
                Operation::Installed {
                    version: v2.clone(),
                    slot: Slot::B,
                },
                false,
                Some("busy: 2.0.0 is installed in slot b and waits for a reboot (cancel it first)"),
            ),
            (
                Operation::Trying {
                    version: v2.clone(),
                    slot: Slot::B,
                },
                false,
                Some("busy: trying"),
            ),
        ] {
            let state = AgentState {
                operation,
                ..AgentState::default()
            };
            let refusal = may_start_install(&state, busy)
                .err()
                .map(|error| error.to_string());
            assert_eq!(refusal.as_deref(), expected);
        }
    }

    #[test]
    fn a_failed_install_leaves_the_slot_unbootable_and_counts() {
        for loader in LOADERS {
            let mut node = Node::fresh(loader);
            node.begin_install("2.0.0");
            let step = install_failed(
                &node.state,
                Slot::B,
                &version("2.0.0"),
                "root.erofs.zst: sha256 mismatch",
                now(),
            );
            assert_eq!(step.actions, [BootAction::MarkUnbootable(Slot::B)]);
            assert_eq!(step.state.operation, Operation::Idle);
            assert_eq!(step.state.update_failures_total, 1);
            let error = step.state.last_error.clone().unwrap();
            assert_eq!(error.operation, "writing");
            assert_eq!(
                error.message,
                "installing 2.0.0: root.erofs.zst: sha256 mismatch"
            );
            node.apply(step);
            assert_eq!(node.power_on(), Some(Slot::A), "{loader:?}");
        }
    }

    #[test]
    fn the_health_gate_decides_a_try_unless_a_person_did() {
        let report = |passed: bool| HealthReport {
            passed,
            reason: (!passed).then(|| "k3s.service failed".to_string()),
            checks: Vec::new(),
            duration: std::time::Duration::from_secs(3),
        };
        for loader in LOADERS {
            let (mut node, v2) = trying(loader);
            let view = node.view(Slot::B);

            let (pass, _) = health_gate_verdict(&node.state, &view, &v2, &report(true), now())
                .unwrap()
                .unwrap();
            assert_eq!(pass.actions, [BootAction::Commit(Slot::B)], "{loader:?}");
            let (fail, message) =
                health_gate_verdict(&node.state, &view, &v2, &report(false), now())
                    .unwrap()
                    .unwrap();
            assert_eq!(fail.actions, [BootAction::MarkBad(Slot::B)], "{loader:?}");
            assert_eq!(
                fail.state.failed_versions[0].reason,
                "health gate failed: k3s.service failed"
            );
            assert!(message.ends_with("slot a boots next"), "{message}");

            // A person marked the try good while the gate ran.
            let (by_hand, _) = mark_good(&node.state, &view, &v2);
            node.apply(by_hand);
            let view = node.view(Slot::B);
            assert_eq!(
                health_gate_verdict(&node.state, &view, &v2, &report(false), now()).unwrap(),
                None,
                "{loader:?}"
            );
        }
    }
}
