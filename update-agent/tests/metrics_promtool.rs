//! The rendered metrics against the tools that read them.
//!
//! `promtool check metrics` (Debian package `prometheus`) parses the
//! Prometheus text format 0.0.4 only (it rejects OpenMetrics' `# TYPE x info`
//! as "unknown metric type"), so it lints [`render_prometheus_text`], the
//! format of the textfile and of the HTTP endpoint for clients that do not ask
//! for OpenMetrics; it must report nothing. Without promtool the test is
//! skipped with a message, unless `RACKLET_REQUIRE_PROMTOOL` is set (to
//! anything but `0`; CI sets it). `PROMTOOL` names another binary.
//!
//! [`render_openmetrics`] is checked with the OpenMetrics parser of the Python
//! client library (Debian package `python3-prometheus-client`) when it is
//! installed, which is strict about `# EOF`, `_total`, `info` and units.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use jiff::Timestamp;
use os_format::layout::Slot;
use os_format::update_manifest::parse_version;
use update_agent::boot_control::SlotBootState;
use update_agent::delta::{FullReasonCode, FullReasonRecord, InstallPath, LastInstallPath};
use update_agent::metrics::{
    render_openmetrics, render_prometheus_text, write_textfile, BootedInfo, MetricsSnapshot,
};
use update_agent::state::{AgentState, Operation, SlotRecord, SlotState};

const REQUIRE_PROMTOOL: &str = "RACKLET_REQUIRE_PROMTOOL";

fn time(text: &str) -> Timestamp {
    text.parse().unwrap()
}

/// A node writing 1.3.0 into slot B while running 1.2.0 from A, with a
/// failed version, a failed check and an odd variant label.
fn busy_snapshot() -> MetricsSnapshot {
    let mut state = AgentState {
        operation: Operation::Writing {
            version: parse_version("1.3.0").unwrap(),
            slot: Slot::B,
            bytes_written: 123_456_789,
            total: 536_870_912,
        },
        ..AgentState::default()
    };
    *state.slot_mut(Slot::A) = SlotRecord {
        state: SlotState::Good,
        version: Some(parse_version("1.2.0").unwrap()),
        verity_root_hash: Some("ab".repeat(32)),
    };
    state.slot_mut(Slot::B).state = SlotState::Unbootable;
    state.record_check(
        time("2026-12-01T10:00:00.250Z"),
        "1.3.0 available",
        Some(parse_version("1.3.0").unwrap()),
    );
    state.record_failed_version(
        parse_version("1.2.5").unwrap(),
        "unit k3s.service is failed",
        time("2026-11-20T00:00:00Z"),
    );
    state.record_failed_version(
        parse_version("1.2.6-rc.1").unwrap(),
        "check 20-ping.sh exited 1",
        time("2026-11-25T00:00:00Z"),
    );
    state.record_error(
        time("2026-12-01T09:00:00Z"),
        "check",
        "GET https://updates.example/1.root.json: timeout",
    );
    MetricsSnapshot {
        state,
        booted: Some(BootedInfo {
            slot: Slot::A,
            version: "1.2.0".into(),
            variant: "rpi4 \"lab\\2\"\nnext".into(),
        }),
        boot_slots: Some([
            (Slot::A, SlotBootState::Good),
            (Slot::B, SlotBootState::Trying { tries_left: 1 }),
        ]),
        written_bytes_total: Some(9_876_543_210),
        last_install: None,
    }
}

/// A node in its boot try of 1.3.0 whose last check failed.
fn trying_snapshot() -> MetricsSnapshot {
    let mut state = AgentState {
        operation: Operation::Trying {
            version: parse_version("1.3.0").unwrap(),
            slot: Slot::B,
        },
        ..AgentState::default()
    };
    state.slot_mut(Slot::A).state = SlotState::Good;
    *state.slot_mut(Slot::B) = SlotRecord {
        state: SlotState::Trying,
        version: Some(parse_version("1.3.0").unwrap()),
        verity_root_hash: None,
    };
    state.record_check(time("2026-12-02T10:00:00Z"), "failed: timeout", None);
    state.record_error(time("2026-12-02T10:00:00Z"), "check", "timeout");
    MetricsSnapshot {
        state,
        booted: Some(BootedInfo {
            slot: Slot::B,
            version: "1.3.0".into(),
            variant: "qemu-x86_64".into(),
        }),
        boot_slots: Some([
            (Slot::A, SlotBootState::Good),
            (Slot::B, SlotBootState::Trying { tries_left: 0 }),
        ]),
        written_bytes_total: None,
        last_install: Some(LastInstallPath {
            time: time("2026-12-02T09:00:00Z"),
            version: parse_version("1.3.0").unwrap(),
            path: InstallPath::Full,
            from_version: None,
            downloaded_bytes: 73_000_000,
            full_bytes: 70_000_000,
            reason: Some(FullReasonRecord {
                code: FullReasonCode::DeltaFailed,
                message: "the delta from 1.2.0 failed".into(),
            }),
        }),
    }
}

fn samples() -> [(&'static str, MetricsSnapshot); 3] {
    [
        ("busy", busy_snapshot()),
        ("trying", trying_snapshot()),
        ("fresh", MetricsSnapshot::default()),
    ]
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn run_with_stdin(command: &Path, args: &[&str], input: &str) -> Output {
    let mut child = Command::new(command)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("cannot run {}: {error}", command.display()));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Print past the test harness's capture, so a skip is seen without `--nocapture`.
fn say(message: &str) {
    let _ = writeln!(std::io::stderr(), "{message}");
}

fn promtool_required() -> bool {
    std::env::var(REQUIRE_PROMTOOL).is_ok_and(|value| !value.is_empty() && value != "0")
}

fn promtool() -> Option<PathBuf> {
    let found = std::env::var_os("PROMTOOL")
        .map(PathBuf::from)
        .or_else(|| find_in_path("promtool"));
    if found.is_none() {
        if promtool_required() {
            panic!(
                "{REQUIRE_PROMTOOL} is set but promtool is not in PATH \
                 (apt-get install prometheus, or set PROMTOOL)"
            );
        }
        say(&format!(
            "SKIPPED: promtool not found in PATH; install the Debian package `prometheus` \
             (or set PROMTOOL, or {REQUIRE_PROMTOOL}=1 to make this a failure)"
        ));
    }
    found
}

fn assert_promtool_accepts(promtool: &Path, what: &str, text: &str) {
    let output = run_with_stdin(promtool, &["check", "metrics"], text);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.trim().is_empty() && stderr.trim().is_empty(),
        "promtool check metrics on the {what} sample: {}\nstdout: {stdout}\nstderr: {stderr}\n\
         text:\n{text}",
        output.status
    );
}

#[test]
fn promtool_lints_the_prometheus_text_clean() {
    let Some(promtool) = promtool() else {
        return;
    };
    for (what, snapshot) in samples() {
        assert_promtool_accepts(&promtool, what, &render_prometheus_text(&snapshot));
    }
}

#[test]
fn promtool_lints_the_textfile_clean() {
    let Some(promtool) = promtool() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("racklet-update.prom");
    write_textfile(&path, &render_prometheus_text(&busy_snapshot())).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_promtool_accepts(&promtool, "textfile", &text);
}

/// A Python with the client library's OpenMetrics parser, if any.
fn python_with_openmetrics_parser() -> Option<PathBuf> {
    let candidates = [
        find_in_path("python3"),
        Some(PathBuf::from("/usr/bin/python3")),
    ];
    candidates.into_iter().flatten().find(|python| {
        Command::new(python)
            .args(["-c", "import prometheus_client.openmetrics.parser"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    })
}

const PARSE_OPENMETRICS: &str = r#"
import sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
for family in text_string_to_metric_families(sys.stdin.read()):
    print(family.name, family.type, family.unit or "-", len(family.samples))
"#;

#[test]
fn openmetrics_parses_with_the_reference_parser() {
    let Some(python) = python_with_openmetrics_parser() else {
        say(
            "SKIPPED: no python3 with prometheus_client (Debian package \
             python3-prometheus-client) to parse the OpenMetrics text",
        );
        return;
    };
    for (what, snapshot) in samples() {
        let text = render_openmetrics(&snapshot);
        let output = run_with_stdin(&python, &["-c", PARSE_OPENMETRICS], &text);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "the OpenMetrics parser rejected the {what} sample: {}\n{}\ntext:\n{text}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let families: Vec<&str> = stdout.lines().collect();
        assert!(
            families.contains(&"racklet_update_update_failures counter - 1"),
            "{what}: {stdout}"
        );
        assert!(
            families.contains(&"racklet_update_operation_progress_bytes gauge bytes 1"),
            "{what}: {stdout}"
        );
        if what == "busy" {
            for expected in [
                "racklet_update info - 1",
                "racklet_update_slot_version info - 1",
                "racklet_update_written_bytes counter bytes 1",
                "racklet_update_last_check_timestamp_seconds gauge seconds 1",
            ] {
                assert!(families.contains(&expected), "{expected}: {stdout}");
            }
        }
    }
}
