"""What a user other than root may do to the update agent on a booted node,
and what the agent's sandbox hides from it (docs/update-flow.md, "Who may
call what"). One check for a boot test to call on a guest booted to its
autologin root shell, the agent running:

    from agent_privileges import check_agent_privileges
    ctx.note(check_agent_privileges(vm))

As nobody (uid 65534, through util-linux's `setpriv`; no user is added):
`racklet-update status` works; `racklet-update check` reaches the agent (it
may fail there, e.g. with no clock sync or no update server in QEMU) and a
second check within the minute is rate limited, while root's is not;
`apply`, `cancel`, `rollback`, `mark-good`, `mark-bad` and `racklet-node
factory-reset` each exit non-zero with the one line that names the command
and says it needs root, and change nothing. Then, in the agent's own mount
namespace (through /proc/<its pid>/root), the SSH host key is not there
while it is on the node. The daemon runs as its own user (racklet-update,
in the disk group, no capabilities), /efi is its group's, logind refuses it a
reboot and racklet-update-reboot.path is active. Last, `systemd-analyze
security` of both agents' units. Call it once per boot: the second call within a minute would find
nobody's first check rate limited.

Guest tools: setpriv (util-linux), systemctl and systemd-analyze (systemd),
cat, stat, test (coreutils), grep. Stdlib only; raises harness.TestFailure.
"""

from __future__ import annotations

import json
import re

from harness import TestFailure, check

NOBODY_UID = 65534
AS_NOBODY = f"setpriv --reuid={NOBODY_UID} --regid={NOBODY_UID} --clear-groups --"
# The commands that change the update state: (arguments, D-Bus method).
STATE_CHANGES = [("apply", "Apply"), ("cancel", "Cancel"), ("rollback", "Rollback"),
                 ("mark-good", "MarkGood"), ("mark-bad --reason privilege-test", "MarkBad")]
# The SSH host key (packages/ssh: made at the first boot on the data partition).
HOST_KEY = "/var/lib/racklet/ssh/ssh_host_ed25519_key"
FACTORY_RESET_FLAG = "/efi/racklet/factory-reset"
# racklet-update-fetch.socket's socket (update-agent/src/fetcher.rs).
FETCHER_SOCKET = "/run/racklet-update-fetch.sock"
# The daemon's user (packages/racklet-agents/racklet-update.sysusers).
AGENT_USER = "racklet-update"
EXPOSURE = re.compile(r"Overall exposure level for (\S+): ([0-9.]+) ([A-Z]+)")
# Longest a check may take before the CLI is stopped (`timeout`): on a guest
# without clock sync the agent refuses at once; a check that went to an
# unreachable server could take many minutes.
CHECK_SECONDS = 120


def needs_root_line(args: str, method: str) -> str:
    command = args.split()[0]
    return (f"racklet-update {command}: refused: changing the update state needs root "
            f"(org.racklet.Update1.{method} is allowed to uid 0 only)")


def agent_state(vm) -> dict:
    """The operation and the slots as root sees them (`racklet-update --json
    status`), waiting for the agent to answer after a boot."""
    text = vm.run("for i in $(seq 90); do racklet-update --json status > /tmp/rk-privileges.json 2>/dev/null"
                  " && break; sleep 2; done; cat /tmp/rk-privileges.json", timeout=240)
    report = json.loads(text[text.index("{"):])
    return {"operation": report["state"]["operation"],
            "slots": [{key: entry.get(key) for key in ("slot", "version", "boot_state", "booted")}
                      for entry in report["boot_slots"]]}


def check_agent_privileges(vm) -> str:
    """Run the checks on `vm` (harness.VM at its root shell); returns a one-line
    summary for the test's notes, raises TestFailure on the first that fails."""
    before = agent_state(vm)

    # Reading.
    code, output = vm.run(f"{AS_NOBODY} racklet-update --json status", check=False)
    check(code == 0, f"racklet-update status as uid {NOBODY_UID} exited {code}: {output.strip()[-400:]}")
    status = json.loads(output[output.index("{"):])
    check(status["booted"]["slot"] in ("a", "b"), f"status as uid {NOBODY_UID}: {status['booted']}")

    # Checking: the first call reaches the agent (0, or 1 with the agent's own
    # failure: "the update agent refused: ..."), the second is rate limited.
    code, output = vm.run(f"timeout {CHECK_SECONDS} {AS_NOBODY} racklet-update check",
                          timeout=CHECK_SECONDS + 60, check=False)
    check(code != 124, f"racklet-update check as uid {NOBODY_UID} did not answer within {CHECK_SECONDS} s")
    reached = code == 0 or (code == 1 and "the update agent refused:" in output)
    check(reached and "rate limited" not in output and "needs root" not in output,
          f"racklet-update check as uid {NOBODY_UID} did not reach the agent: exit {code}: {output.strip()}")
    first_check = f"exit {code}" + ("" if code == 0 else f" ({output.strip().splitlines()[-1][:120]})")
    code, output = vm.run(f"{AS_NOBODY} racklet-update check", check=False)
    limited = re.search(r"rate limited: .* try again in (\d+) s", output)
    check(code == 2 and limited, f"a second check as uid {NOBODY_UID} was not rate limited: exit {code}: "
                                 f"{output.strip()}")
    code, output = vm.run(f"timeout {CHECK_SECONDS} racklet-update check", timeout=CHECK_SECONDS + 60,
                          check=False)
    check(code != 124, f"racklet-update check as root did not answer within {CHECK_SECONDS} s")
    check("rate limited" not in output, f"root's check was rate limited: exit {code}: {output.strip()}")

    # Changing the state: each refused with its one line; the factory reset too.
    flag_before = vm.run(f"test -e {FACTORY_RESET_FLAG}; echo $?").strip()
    for args, method in STATE_CHANGES:
        code, output = vm.run(f"{AS_NOBODY} racklet-update {args}", check=False)
        line = needs_root_line(args, method)
        check(code == 2 and f"error: {line}" in output.splitlines(),
              f"racklet-update {args} as uid {NOBODY_UID}: exit {code}, expected 2 and {line!r}: {output.strip()}")
    code, output = vm.run(f"{AS_NOBODY} racklet-node factory-reset --yes", check=False)
    check(code != 0 and "racklet-node factory-reset: refused: a factory reset needs root" in output,
          f"racklet-node factory-reset as uid {NOBODY_UID}: exit {code}: {output.strip()}")
    flag = vm.run(f"test -e {FACTORY_RESET_FLAG}; echo $?").strip()
    check(flag == flag_before,
          f"a refused factory reset changed {FACTORY_RESET_FLAG} (test -e: {flag_before} -> {flag})")
    after = agent_state(vm)
    check(after == before, f"the refused calls changed the agent's state: {before} -> {after}")

    # The agent's sandbox: its mount namespace has no host key, the node has.
    pid = vm.run("systemctl show -p MainPID --value racklet-update.service").strip()
    check(pid.isdigit() and pid != "0", f"racklet-update.service's main PID: {pid!r}")
    check(vm.run(f"test -s {HOST_KEY}; echo $?").strip() == "0", f"{HOST_KEY} is not on the node")
    code, output = vm.run(f"cat /proc/{pid}/root/etc/os-release", check=False)
    check(code == 0 and "IMAGE_VERSION" in output,
          f"the agent's root (/proc/{pid}/root) cannot be read at all: {code} {output.strip()[:200]}")
    # (Its contents go to /dev/null: never into the serial log.)
    code, output = vm.run(f"cat /proc/{pid}/root{HOST_KEY} > /dev/null", check=False)
    check(code != 0, f"the agent (pid {pid}) can read {HOST_KEY}: cat exited 0")
    mode = vm.run(f"stat -c %a /proc/{pid}/root{HOST_KEY.rsplit('/', 1)[0]}", check=False)[1].strip()
    check(mode == "0", f"{HOST_KEY.rsplit('/', 1)[0]} in the agent's namespace has mode {mode!r}, "
                       "expected 0 (InaccessiblePaths=)")

    # The daemon is not root: its own user, the disk group for the slots, no
    # capabilities; the ESP is its group's; logind refuses it a reboot (it
    # asks through racklet-update-reboot.path, which is active).
    ids = vm.run(f"grep -E '^(Uid|Gid|Groups|CapEff):' /proc/{pid}/status", check=False)[1]
    fields = dict(re.findall(r"^(\w+):\s*([^\r\n]*)", ids, re.M))
    agent_uid = vm.run(f"id -u {AGENT_USER}", check=False)[1].strip()
    disk_gid = vm.run("getent group disk | cut -d: -f3", check=False)[1].strip()
    check(agent_uid.isdigit() and agent_uid != "0" and fields.get("Uid", "").split()[:1] == [agent_uid],
          f"the agent runs as uid {fields.get('Uid')!r}, expected {AGENT_USER} ({agent_uid!r}), not root")
    check(disk_gid in fields.get("Groups", "").split(), f"the agent's groups {fields.get('Groups')!r} lack disk")
    check(int(fields.get("CapEff", "1"), 16) == 0, f"the agent has capabilities: CapEff {fields.get('CapEff')}")
    esp = vm.run("ls /efi > /dev/null; stat -c '%a %U %G' /efi", check=False)[1].strip().splitlines()[-1]
    check(esp == f"770 root {AGENT_USER}", f"/efi: mode, owner, group {esp!r}, expected '770 root {AGENT_USER}'")
    code, output = vm.run(f"setpriv --reuid={AGENT_USER} --regid={AGENT_USER} --init-groups -- busctl call "
                          "org.freedesktop.login1 /org/freedesktop/login1 org.freedesktop.login1.Manager "
                          "Reboot b false", check=False)
    check(code != 0, f"logind let {AGENT_USER} reboot: exit {code} {output.strip()[:200]}")
    logind_refusal = output.strip().splitlines()[-1] if output.strip() else f"exit {code}"
    reboot_path = vm.run("systemctl is-enabled racklet-update-reboot.path; "
                         "systemctl is-active racklet-update-reboot.path", check=False)[1].split()
    check(reboot_path[-2:] == ["enabled", "active"], f"racklet-update-reboot.path: {reboot_path}")

    # The fetcher's socket: only the agent's user (and root) may ask for downloads.
    socket = vm.run(f"stat -c '%a %U' {FETCHER_SOCKET}", check=False)[1].strip()
    check(socket == f"600 {AGENT_USER}", f"{FETCHER_SOCKET}: mode and owner {socket!r}, "
                                         f"expected '600 {AGENT_USER}'")
    deny = vm.run("systemctl show -p IPAddressDeny --value racklet-update.service").strip()
    check(deny not in ("", "n/a"), f"racklet-update.service has no IPAddressDeny= (network): {deny!r}")

    # How exposed systemd rates the units (the fetcher through an instance name).
    scores = {}
    for unit, most in (("racklet-update.service", 2.0), ("racklet-update-fetch@probe.service", 1.5),
                       ("racklet-node.service", None)):
        output = vm.run(f"systemd-analyze security --no-pager {unit} "
                        "| grep -o 'Overall exposure level for [^ ]*: [0-9.]* [A-Z]*'", check=False)[1]
        match = EXPOSURE.search(output)
        check(match and match.group(1) == unit, f"systemd-analyze security {unit}: {output.strip()}")
        check(match.group(3) in ("SAFE", "OK"), f"systemd-analyze security rates {unit} {match.group(2)} "
                                                 f"{match.group(3)}, expected SAFE or OK")
        check(most is None or float(match.group(2)) <= most,
              f"systemd-analyze security rates {unit} {match.group(2)}, expected at most {most}")
        scores[unit] = f"{match.group(2)} {match.group(3)}"

    return (f"as uid {NOBODY_UID}: status ok, check reached the agent ({first_check}), a second check "
            f"rate limited (try again in {limited.group(1)} s), root's not; apply, cancel, rollback, "
            f"mark-good, mark-bad and racklet-node factory-reset refused (needs root), nothing changed; "
            f"the agent (pid {pid}) runs as {AGENT_USER} (uid {agent_uid}, groups {fields.get('Groups')}, no "
            f"capabilities), /efi {esp}, logind refuses it a reboot ({logind_refusal[:120]}); "
            f"it cannot read {HOST_KEY} (mode 0 in its namespace); {FETCHER_SOCKET} 600 {AGENT_USER}; "
            f"systemd-analyze security: "
            + ", ".join(f"{unit} {score}" for unit, score in scores.items()))


__all__ = ["check_agent_privileges", "TestFailure"]
