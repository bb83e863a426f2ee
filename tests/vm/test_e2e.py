#!/usr/bin/env python3
"""End-to-end update tests: the real agent in QEMU (TCG) against a real,
signed repository served from this process on 127.0.0.1.

    python3 tests/vm/test_e2e.py [--only NAME[,NAME]] [--list] [--builds DIR]
    python3 tests/vm/test_e2e.py --only powercut --count N     # the soak

Versions 1.0.0, 2.0.0 and 3.0.0 of the variant (--variant: qemu-x86_64, the
systemd-boot path, or qemu-aarch64, the Raspberry Pi's U-Boot path; 3.0.0 adds
the test-failing-health recipe) are built into DIR/v{1,2,3}/VARIANT (DIR
default build/e2e; reused when their manifest.json says the right version)
with the signing keys in DIR/keys.
Each test publishes into its own repository (racklet-image publish), serves it
with tests/vm/e2e_server.py, and boots a qcow2 overlay of version 1's disk with
QEMU user-mode networking whose only way out is a guestfwd of 10.0.2.100:80 to
that server. See tests/vm/README.md ("End-to-end updates").
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import fcntl
import gzip
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    AUTOLOGIN, COMMITTED_BOOT_TRIES, HarnessError, Overlay, TestFailure, VM, check, clean, committed_uki_slot,
    copy_sparse, decode_uboot_env, require_tools, uboot_newest)
from e2e_server import RepoServer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SERVER_SCRIPT = Path(__file__).resolve().parent / "e2e_server.py"
# The variants this suite boots and their arch (x86_64: systemd-boot; aarch64: U-Boot).
VARIANTS = {"qemu-x86_64": "x86_64", "qemu-aarch64": "aarch64"}
# How a full root target's name ends (a patch's ends in "-root.erofs.zst-patch").
FULL_ROOT_TARGET = "-root.erofs.zst"
VERSIONS = {"v1": ("1.0.0", []), "v2": ("2.0.0", []), "v3": ("3.0.0", ["test-failing-health"])}

BOOT_FAILURE = re.compile(
    r"(racklet-init: FATAL|Kernel panic|login: PAM Failure|racklet: nothing bootable)[^\r\n]*\r?\n")
# A boot, and the slot it runs. Under host load the guest's console loses
# bytes (the kernel's console write gives up waiting for the emulated UART):
# "racklet.slot=a" was seen as "rklet.slot=a", and a whole "Kernel command
# line:" line lost (an OVMF "BdsDxe: starting Boot" line was also missed).
# The x86_64 kernel prints its command line twice ("Command line:" and
# "Kernel command line:"), so either counts; a boot may then match twice,
# which the callers allow for (they move past the login, or look for the
# slot they expect). Group 1: ".slot=X".
BOOT_LINE = re.compile(r"(?:\] Command line: |Kernel command line: )[^\r\n]*?(\.slot=[ab])")
VERITY_CORRUPTION = re.compile(r"device-mapper: verity: [^\r\n]*corrupted")


# ---------------------------------------------------------------------------
# Builds, repositories


class Builds:
    """build/e2e/{v1,v2,v3}/VARIANT and the keys they trust (build/e2e/keys)."""

    def __init__(self, root: Path, variant: str, build_missing: bool):
        self.root = root
        self.variant = variant
        self.arch = VARIANTS[variant]
        self.keys = root / "keys"
        self.builder = REPO / "target/release/racklet-image"
        self.dirs: dict[str, Path] = {}
        for name, (version, recipes) in VERSIONS.items():
            out = root / name
            manifest = out / variant / "manifest.json"
            current = json.loads(manifest.read_text()).get("version") if manifest.exists() else None
            if current != version:
                if not build_missing:
                    raise HarnessError(f"{manifest}: version {current}, expected {version}; "
                                       f"run `make e2e` (or drop --no-build)")
                self.make(out, version, recipes)
            self.dirs[name] = out / variant
        if not (self.keys / "root.json").exists():
            raise HarnessError(f"{self.keys}/root.json is missing (the builds' trust anchor)")

    def make(self, out: Path, version: str, recipes: list[str]) -> None:
        print(f"building {self.variant} {version} into {out} ...", flush=True)
        subprocess.run(["make", "-C", str(REPO), "keys", f"KEYS={self.keys}"], check=True,
                       stdout=subprocess.DEVNULL)
        command = ["make", "-C", str(REPO), f"variant={self.variant}", "build", f"OUTPUT={out}",
                   f"VERSION={version}", f"KEYS={self.keys}"]
        if recipes:
            command.append(f"EXTRA_RECIPES={' '.join(recipes)}")
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise HarnessError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")

    def version(self, name: str) -> str:
        return VERSIONS[name][0]

    def manifest(self, name: str) -> dict:
        return json.loads((self.dirs[name] / "manifest.json").read_text())


class Repo:
    """A signed repository in the test's directory, published with racklet-image."""

    def __init__(self, builds: Builds, path: Path):
        self.builds = builds
        self.path = path

    def image(self, *args: str) -> str:
        command = [str(self.builds.builder), *args]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise HarnessError(f"{' '.join(command)} failed ({result.returncode}):\n"
                               f"{result.stderr.strip()}\n{result.stdout.strip()}")
        return result.stdout

    def publish(self, build: str | Path, *extra: str, deltas: bool = False) -> None:
        """Publish a build; with `deltas`, racklet-image's patches from the
        earlier versions too (its default), else none (`--delta-sources 0`,
        so that the tests of the full download, e.g. a modified root or
        hash-tree target, are not bypassed by a delta)."""
        directory = self.builds.dirs[build] if isinstance(build, str) else build
        self.image("publish", "--build", str(directory), "--repo", str(self.path),
                   "--keys", str(self.builds.keys), *(() if deltas else ("--delta-sources", "0")), *extra)

    def target_path(self, version: str, artifact: str) -> str:
        """The URL path of a published target, e.g. (2.0.0, root-filesystem)."""
        for name in sorted((self.path / "targets").iterdir()):
            if f".{self.builds.variant}-{version}-" in name.name and artifact in name.name:
                return f"/targets/{name.name}"
        raise HarnessError(f"no {artifact} target of {version} in {self.path}/targets: "
                           f"{[p.name for p in (self.path / 'targets').iterdir()]}")

    def metadata(self) -> dict[str, bytes]:
        return {f"/metadata/{p.name}": p.read_bytes() for p in (self.path / "metadata").iterdir()}

    def resign_update_manifest(self, mutate, extra_targets: dict[str, Path] | None = None) -> None:
        """Change the published update manifest with `mutate(dict)` and sign
        new targets, snapshot and timestamp metadata with the repository's own
        keys, as a publisher that skips racklet-image's checks (or a thief of
        its keys) could. `extra_targets` (name: file) are signed and served
        too. Uses python-tuf's Metadata API, not our publisher."""
        try:
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
            from securesystemslib.signer import CryptoSigner, SSlibKey
            from tuf.api.metadata import Metadata, MetaFile, TargetFile
        except ImportError as error:
            raise HarnessError(f"python-tuf is needed to re-sign metadata ({error}); "
                               f"run image-builder/scripts/test-tools.sh") from error
        metadata_dir = self.path / "metadata"
        root = json.loads((self.builds.keys / "root.json").read_text())["signed"]
        signers = {}
        for key_file in (self.builds.keys / "keys").glob("*.pk8.der"):
            role = key_file.name.split("-")[0]
            # ring's PKCS#8 v2 (with the public key), which `cryptography`
            # does not parse: the seed is the inner OCTET STRING (04 20 ...).
            der = key_file.read_bytes()
            start = der.index(b"\x04\x22\x04\x20") + 4
            private = Ed25519PrivateKey.from_private_bytes(der[start:start + 32])
            public = private.public_key().public_bytes_raw().hex()
            keyid = next(k for k, v in root["keys"].items() if v["keyval"]["public"] == public)
            signers[role] = CryptoSigner(private, SSlibKey(keyid, "ed25519", "ed25519", {"public": public}))

        def meta_file(old: MetaFile, version: int, data: bytes) -> MetaFile:
            if old.hashes or old.length:
                return MetaFile.from_data(version, data, list(old.hashes or {"sha256": ""}))
            return MetaFile(version)

        def sign(metadata, role: str, path: Path) -> bytes:
            metadata.signatures.clear()
            metadata.sign(signers[role])
            data = metadata.to_bytes()
            path.write_bytes(data)
            return data

        timestamp = Metadata.from_bytes((metadata_dir / "timestamp.json").read_bytes())
        snapshot_version = timestamp.signed.snapshot_meta.version
        snapshot = Metadata.from_bytes((metadata_dir / f"{snapshot_version}.snapshot.json").read_bytes())
        targets_meta = snapshot.signed.meta["targets.json"]
        targets = Metadata.from_bytes((metadata_dir / f"{targets_meta.version}.targets.json").read_bytes())
        name = next(n for n in targets.signed.targets if n.endswith("manifest.json"))
        target = targets.signed.targets[name]
        digest = target.hashes["sha256"]
        manifest = json.loads((self.path / "targets" / f"{digest}.{name}").read_bytes())
        mutate(manifest)
        data = json.dumps(manifest, indent=2).encode()
        new_target = TargetFile.from_data(name, data, ["sha256"])
        (self.path / "targets" / f"{new_target.hashes['sha256']}.{name}").write_bytes(data)
        targets.signed.targets[name] = new_target
        for extra_name, path in (extra_targets or {}).items():
            extra = TargetFile.from_file(extra_name, str(path), ["sha256"])
            served = self.path / "targets" / f"{extra.hashes['sha256']}.{extra_name}"
            if not served.exists():
                os.link(path, served)
            targets.signed.targets[extra_name] = extra
        targets.signed.version += 1
        targets_bytes = sign(targets, "targets", metadata_dir / f"{targets.signed.version}.targets.json")
        snapshot.signed.meta["targets.json"] = meta_file(targets_meta, targets.signed.version, targets_bytes)
        snapshot.signed.version += 1
        snapshot_bytes = sign(snapshot, "snapshot", metadata_dir / f"{snapshot.signed.version}.snapshot.json")
        timestamp.signed.snapshot_meta = meta_file(timestamp.signed.snapshot_meta, snapshot.signed.version,
                                                   snapshot_bytes)
        timestamp.signed.version += 1
        sign(timestamp, "timestamp", metadata_dir / "timestamp.json")


# ---------------------------------------------------------------------------
# The VM with networking


class NetVM(VM):
    """harness.VM with user-mode networking instead of `-nic none`: the guest's
    only route out is 10.0.2.100:80, relayed to our server on 127.0.0.1."""

    def __init__(self, *args, port: int, block: list[str] | None = None, tls_port: int | None = None, **kwargs):
        self.port = port
        self.block = block
        self.tls_port = tls_port
        super().__init__(*args, **kwargs)

    def command(self) -> list[str]:
        command = super().command()
        index = command.index("-nic")
        del command[index:index + 2]
        if self.block:
            index = command.index("if=none,id=disk0,format=qcow2,file=" + str(self.disk))
            command[index] = self.block[0]
        relay = f"cmd:{sys.executable} {SERVER_SCRIPT} --relay {self.port}"
        netdev = f"user,id=n0,restrict=on,guestfwd=tcp:10.0.2.100:80-{relay}"
        if self.tls_port:
            netdev += f",guestfwd=tcp:10.0.2.100:443-cmd:{sys.executable} {SERVER_SCRIPT} --relay {self.tls_port}"
        return command + ["-netdev", netdev, "-device", "virtio-net-pci,netdev=n0"]

    def sigkill(self) -> None:
        """Power cut: SIGKILL QEMU (no shutdown, nothing flushed by the guest)."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
            self.note("QEMU killed (SIGKILL): power cut")
        self._release_serial()


class Context:
    def __init__(self, name: str, scratch: Path, builds: Builds, options):
        self.name = name
        self.dir = scratch / name
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        self.scratch = scratch
        self.builds = builds
        self.options = options
        self.vms: list[NetVM] = []
        self.notes: list[str] = []
        self.servers: list[RepoServer] = []
        self.phases: list[tuple[str, float]] = []

    def disk(self, name: str) -> Path:
        """A sparse copy of version `name`'s disk (made once per run)."""
        copy = self.scratch / "images" / name / "disk.img"
        if not copy.exists():
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy_sparse(self.builds.dirs[name] / "disk.img", copy)
        return copy

    def overlay(self, name: str = "v1", label: str = "disk") -> Overlay:
        self.last_overlay = Overlay(self.disk(name), self.dir / f"{label}.qcow2")
        return self.last_overlay

    def node(self, server: RepoServer, name: str = "v1", label: str = "vm", block=None,
             **vm_options) -> NetVM:
        """A fresh node of version `name`, booted into slot A, at its root
        shell, talking to `server`. Resumed from a state saved once per run
        just after such a boot (a boot under TCG costs 20-60 s; the state
        loads in a few): see saved_boot(). --cold-boot boots each one, and so
        does a node with `vm_options` (NetVM's: more devices or forwards than
        the saved state has)."""
        if self.options.cold_boot or vm_options:
            overlay = self.overlay(name, label)
            vm = self.vm(overlay, server, label, block=block(overlay) if block else None, **vm_options)
            boot_to_shell(vm, "a")
            return vm
        saved = saved_boot(self, name)
        self.last_overlay = overlay = Overlay(saved.disk, self.dir / f"{label}.qcow2", base_format="qcow2",
                                              layout=saved.raw)
        vars_copy = None
        if saved.ovmf_vars:
            vars_copy = self.dir / f"{label}.OVMF_VARS.fd"
            shutil.copyfile(saved.ovmf_vars, vars_copy)
        vm = self.vm(overlay, server, label, block=block(overlay) if block else None,
                     incoming=saved.state, ovmf_vars=vars_copy)
        vm.start()
        vm.note(f"resumed from {saved.state} (saved {time.time() - saved.saved_at:.0f} s ago, "
                f"{saved.boot_seconds:.1f} s after power-on)")
        vm.resume_shell()
        return vm

    def repo(self, *published: str, deltas: bool = False) -> tuple[Repo, RepoServer]:
        repo = Repo(self.builds, self.dir / "repo")
        for name in published:
            repo.publish(name, deltas=deltas)
        server = RepoServer(repo.path)
        self.servers.append(server)
        return repo, server

    def vm(self, overlay: Overlay, server: RepoServer, label: str = "vm", **kwargs) -> NetVM:
        kwargs.setdefault("memory", self.options.memory)
        vm = NetVM(self.builds.arch, overlay, self.dir, label, port=server.port, **kwargs)
        self.vms.append(vm)
        return vm

    def note(self, text: str) -> None:
        self.notes.append(text)

    def phase(self, name: str, seconds: float) -> None:
        self.phases.append((name, seconds))
        print(f"     phase {self.name}: {name}: {seconds:.1f} s", flush=True)

    def close(self) -> None:
        for vm in self.vms:
            vm.close()
        for server in self.servers:
            server.close()


@dataclasses.dataclass
class SavedBoot:
    raw: Path  # the raw disk the overlay is of (partition offsets)
    disk: Path  # the frozen qcow2 overlay of the raw image
    state: Path  # QEMU's migration stream
    ovmf_vars: Path | None
    boot_seconds: float
    saved_at: float


SAVED_BOOTS: dict[str, SavedBoot] = {}


def saved_boot(ctx: Context, name: str) -> SavedBoot:
    """Version `name` booted once (per run) from power-on into slot A, up to a
    settled system (`is-system-running --wait`, everything synced), and its
    state saved. The agent waits for time sync there (the image's default),
    so it has fetched nothing.

    With --saved-boots DIR the saved boot is shared with other runs of this
    script that use the same DIR at the same time (make test: the e2e jobs of
    one variant): the first one boots and saves under a lock, the others wait
    for it and resume from the same files; DIR/<variant>-<version>-<root hash>/
    holds its own copy of the disk, so no run's clean-up can pull it away."""
    if name in SAVED_BOOTS:
        return SAVED_BOOTS[name]
    shared = ctx.options.saved_boots
    if shared is None:
        directory = ctx.scratch / "saved-boot" / name
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        SAVED_BOOTS[name] = boot_and_save(ctx, name, directory, ctx.disk(name))
        return SAVED_BOOTS[name]
    manifest = ctx.builds.manifest(name)
    key = f"{ctx.options.variant}-{manifest['version']}-{manifest['verity']['root_hash'][:16]}-{ctx.options.memory}M"
    directory = shared / key
    shared.mkdir(parents=True, exist_ok=True)
    with open(shared / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held while another run boots and saves
        record = directory / "saved.json"
        if record.exists():
            meta = json.loads(record.read_text())
            saved = SavedBoot(directory / "disk.img", directory / "disk.qcow2", directory / "state",
                              Path(meta["ovmf_vars"]) if meta["ovmf_vars"] else None,
                              meta["boot_seconds"], meta["saved_at"])
            print(f"     {name}: resuming from the boot another run saved in {directory}", flush=True)
        else:
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True)
            raw = directory / "disk.img"
            copy_sparse(ctx.builds.dirs[name] / "disk.img", raw)
            saved = boot_and_save(ctx, name, directory, raw)
            # Written last: its presence says the files above are complete.
            record.write_text(json.dumps({
                "ovmf_vars": str(saved.ovmf_vars) if saved.ovmf_vars else None,
                "boot_seconds": saved.boot_seconds, "saved_at": saved.saved_at}))
    SAVED_BOOTS[name] = saved
    return saved


def boot_and_save(ctx: Context, name: str, directory: Path, raw: Path) -> SavedBoot:
    """Boot an overlay of `raw` in `directory` from power-on to a settled
    system and save the VM's state there (see saved_boot)."""
    overlay = Overlay(raw, directory / "disk.qcow2")
    # No server: nothing in the guest talks to 10.0.2.100 before a test
    # configures the agent (a connection would reach a closed port).
    vm = NetVM(ctx.builds.arch, overlay, directory, "boot", port=1, memory=ctx.options.memory, monitor=True)
    try:
        started = time.monotonic()
        boot_to_shell(vm, "a")
        vm.run("systemctl is-system-running --wait > /dev/null; sync", check=False, timeout=300)
        seconds = time.monotonic() - started
        state = directory / "state"
        vm.save_state(state)
    finally:
        vm.close()
    print(f"     {name} booted from power-on in {seconds:.0f} s and saved "
          f"({state.stat().st_size // (1 << 20)} MiB); each node of {name} resumes from there", flush=True)
    return SavedBoot(raw, overlay.path, state, vm.ovmf_vars, seconds, time.time())


TESTS: list[tuple[str, tuple[str, ...], object]] = []


def test(*arches: str):
    """Register a test for these arches (default x86_64 only: waves, attacks and
    faults exercise the agent's arch-independent logic; the update loop and the
    power cuts run on both boot paths)."""
    def register(function):
        TESTS.append((function.__name__, arches or ("x86_64",), function))
        return function
    return register


# ---------------------------------------------------------------------------
# Steps on the guest


def boot_to_shell(vm: NetVM, slot: str | None = None, timeout: float = 400) -> dict:
    """Start (if needed); wait for racklet-init and the autologin shell.
    Returns the slot and timings (seconds since QEMU start)."""
    if not vm.running():
        vm.start()
    started = time.monotonic()
    cmdline = vm.expect(BOOT_LINE, timeout=timeout, fail=BOOT_FAILURE)
    found = re.search(r"\.slot=([ab])", cmdline.group(1))
    booted = found.group(1) if found else "?"
    if slot:
        check(booted == slot, f"expected slot {slot} on the kernel command line, got: {cmdline.group(1)}")
    login = vm.expect(AUTOLOGIN, timeout=timeout, fail=BOOT_FAILURE)
    vm.cursor = login.start()
    vm.wait_for_login(timeout=60)
    # The login can come before the agent is up (a slow boot, late in the
    # start-up order): wait for its D-Bus name (Type=dbus) or its failure.
    vm.run("for i in $(seq 300); do systemctl is-active -q racklet-update && break; "
           "systemctl is-failed -q racklet-update && break; sleep 1; done", timeout=330, check=False)
    return {"slot": booted, "seconds": time.monotonic() - started, "login": vm.time_at(login.start())}


# tough's record of the latest clock reading (update-agent/src/tuf.rs).
TUF_LATEST_KNOWN_TIME = "/var/lib/racklet/update/tuf/latest_known_time.json"

AGENT_CONFIG = """\
wait_for_time_sync = false
check_interval_seconds = {interval}
check_jitter_seconds = 0
auto_apply = {auto}
auto_reboot = {reboot}
http_timeout_seconds = {http_timeout}

[health]
timeout_seconds = 120
"""


def write_file(vm: NetVM, path: str, text: str) -> None:
    encoded = base64.b64encode(text.encode()).decode()
    # Synced: a power cut test must not lose its own setup (a file written
    # just before the cut may otherwise come back empty: ext4 delays it).
    vm.run(f"mkdir -p $(dirname {path}) && echo {encoded} | base64 -d > {path} && sync")


def wait_for_network(vm: NetVM, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        # restrict=on: DHCP gives 10.0.2.15/24 and no default route; the
        # repository (10.0.2.100) is on the link.
        status, output = vm.run("timeout 10 bash -c 'echo > /dev/tcp/10.0.2.100/80'", check=False, timeout=30)
        if status == 0:
            return
        if time.monotonic() > deadline:
            raise HarnessError(f"10.0.2.100:80 not reachable after {timeout:.0f} s ({output.strip()}): {vm.run('ip -br addr', check=False)}")
        time.sleep(2)


def configure_agent(vm: NetVM, auto: bool, interval: int = 3600, http_timeout: int = 600,
                    restart: bool = True, reboot: bool | None = None) -> None:
    """Write /etc/racklet/update.toml and restart the agent (it checks at once:
    jitter 0)."""
    write_file(vm, "/etc/racklet/update.toml",
               AGENT_CONFIG.format(interval=interval, auto=str(auto).lower(), http_timeout=http_timeout,
                                   reboot=str(auto if reboot is None else reboot).lower()))
    if restart:
        wait_for_network(vm)
        vm.run("systemctl restart racklet-update", timeout=120)


def status(vm: NetVM, timeout: float = 90) -> dict:
    """`racklet-update --json status`, parsed."""
    code, output = vm.run("racklet-update --json status 2>/tmp/rk-status.err; r=$?; "
                          "cat /tmp/rk-status.err >&2; (exit $r)", timeout=timeout, check=False)
    start = output.find("{")
    if code != 0 or start < 0:
        raise HarnessError(f"racklet-update status exited {code}: {output.strip()}")
    decoder = json.JSONDecoder()
    value, _ = decoder.raw_decode(output[start:])
    return value


def cli_json(vm: NetVM, command: str, timeout: float = 900) -> tuple[int, dict | str]:
    """`racklet-update --json COMMAND`: (exit status, parsed JSON or the raw text)."""
    code, output = vm.run(f"racklet-update --json {command} 2>/tmp/rk-cli.err; r=$?; "
                          f"cat /tmp/rk-cli.err >&2; (exit $r)", timeout=timeout, check=False)
    start = output.find("{")
    if start >= 0:
        try:
            value, _ = json.JSONDecoder().raw_decode(output[start:])
            value["_raw"] = output
            return code, value
        except json.JSONDecodeError:
            pass
    return code, output


def slot_view(report: dict, slot: str) -> dict:
    entry = next((s for s in report["boot_slots"] if s["slot"] == slot), {})
    record = report["state"]["slots"][slot]
    return {"boot_state": entry.get("boot_state"), "state": record.get("state"),
            "version": record.get("version"), "booted": entry.get("booted")}


def summary(report: dict) -> str:
    state = report["state"]
    failed = [(f["version"], f["reason"]) for f in state.get("failed_versions", [])]
    error = state.get("last_error")
    check_result = (state.get("last_check") or {}).get("result")
    return (f"booted {report['booted']['slot']} {report['booted']['version']}, "
            f"next boot {report.get('next_boot')}; "
            f"a={slot_view(report, 'a')} b={slot_view(report, 'b')}; op={state['operation']}; "
            f"last_check={check_result!r}; last_error={error and error.get('message')!r}; failed={failed}")


def journal(vm: NetVM, lines: int = 40, boot: str = "") -> str:
    return vm.run(f"journalctl --no-pager -o short-monotonic -u racklet-update {boot} | tail -n {lines}",
                  check=False, timeout=60)[1]


def esp_entries(vm: NetVM) -> list[str]:
    return vm.run("ls /efi/EFI/Linux").split()


def try_placed(words: list[str]) -> bool:
    """The monitor's ESP words show a try of slot B placed for the boot loader:
    systemd-boot's counted entry, or a U-Boot state copy with one try of B."""
    return (any(word in ("racklet-b+1.efi", "racklet-b+0-1.efi") for word in words)
            or "uboot-try-b" in words)


UBOOT_STATE_LINE = re.compile(r"RKSTATE([12]) ([A-Za-z0-9+/=]*)")


def uboot_state(vm: NetVM) -> dict:
    """The U-Boot boot state as boot.scr reads it: both copies of
    racklet/state-{1,2}.env (None where missing or failing its CRC), the one
    the script uses (harness.uboot_newest) and whether the marker racklet/committed-b exists. The copies travel
    gzipped (4 KiB of mostly zeros) over the serial console."""
    _, output = vm.run("for n in 1 2; do echo RKSTATE$n $(gzip -c /efi/racklet/state-$n.env 2>/dev/null "
                       "| base64 -w0); done; test -e /efi/racklet/committed-b && echo RKMARKER-B", check=False)
    copies: list[dict | None] = [None, None]
    for match in UBOOT_STATE_LINE.finditer(output):
        if match.group(2):
            copies[int(match.group(1)) - 1] = decode_uboot_env(gzip.decompress(base64.b64decode(match.group(2))))
    newest = uboot_newest(copies)
    return {"copies": copies, "newest": None if newest is None else copies[newest],
            "marker_b": "RKMARKER-B" in output}


def describe_uboot(state: dict) -> str:
    newest = state["newest"] or {}
    return (f"newest copy: seq {newest.get('racklet_seq')} order {newest.get('racklet_order')!r} committed "
            f"{newest.get('racklet_committed')} tries a={newest.get('racklet_tries_a')} "
            f"b={newest.get('racklet_tries_b')}; committed-b marker: {state['marker_b']}; "
            f"valid copies: {[c is not None for c in state['copies']]}")


def boot_confirmed(vm: NetVM, slot: str) -> bool:
    """The agent confirmed this boot of the committed `slot` (its health gate
    passed): all its boots are back, `racklet-<slot>+3.efi` (systemd-boot) or
    no boot of it counted in the newest U-Boot state copy."""
    if vm.arch == "x86_64":
        return f"racklet-{slot}+{COMMITTED_BOOT_TRIES}.efi" in esp_entries(vm)
    newest = uboot_state(vm)["newest"] or {}
    return newest.get(f"racklet_boots_{slot}", "0") in ("", "0")


def wait_for_boot_confirmed(vm: NetVM, slot: str, timeout: float = 300) -> float:
    """Wait until the agent confirmed the boot of committed `slot`; seconds waited."""
    started = time.monotonic()
    while not boot_confirmed(vm, slot):
        if time.monotonic() - started > timeout:
            raise TestFailure(f"the agent did not confirm this boot of slot {slot} within {timeout:.0f} s: "
                              f"{esp_entries(vm) if vm.arch == 'x86_64' else describe_uboot(uboot_state(vm))}\n"
                              f"agent journal:\n{journal(vm)}")
        time.sleep(3)
    return time.monotonic() - started


def check_committed_on_esp(vm: NetVM, slot: str, other_bootable: bool | None = None) -> str:
    """The boot loader's own record says `slot` is committed, as its boot
    loader will read it: systemd-boot, a committed entry with boots left
    (`racklet-<slot>+3.efi` and its counted-down names) and no try;
    U-Boot, the newest state copy commits `slot` uncounted and first in the
    order, and the marker racklet/committed-b matches. With other_bootable
    given, whether the other slot is in the boot order too (or, on
    systemd-boot, has an uncounted entry). Returns what it saw."""
    other = "b" if slot == "a" else "a"
    if vm.arch == "x86_64":
        entries = esp_entries(vm)
        mine = [e for e in entries if e.startswith(f"racklet-{slot}")]
        check(committed_entry(entries, slot) and len(mine) == 1,
              f"slot {slot} should have one committed entry on the ESP: {entries}")
        if other_bootable is not None:
            check(committed_entry(entries, other) == other_bootable,
                  f"slot {other} should {'' if other_bootable else 'not '}have a committed entry: {entries}")
        return f"EFI/Linux: {entries}"
    state = uboot_state(vm)
    newest = state["newest"]
    seen = describe_uboot(state)
    check(newest is not None, f"no valid U-Boot state copy: {seen}")
    order = newest.get("racklet_order", "").split()
    check(newest.get("racklet_committed") == slot and newest.get(f"racklet_tries_{slot}") == "-"
          and order[:1] == [slot], f"the U-Boot state should commit slot {slot}: {seen}")
    check(state["marker_b"] == (slot == "b"), f"racklet/committed-b should {'' if slot == 'b' else 'not '}"
          f"exist with slot {slot} committed: {seen}")
    if other_bootable is not None:
        check((other in order) == other_bootable,
              f"slot {other} should {'' if other_bootable else 'not '}be in the boot order: {seen}")
    return seen


def boot_loader_committed(ctx: Context, vm: NetVM, step: str, slot: str, other_bootable: bool,
                          tried: str, since: int) -> None:
    """check_committed_on_esp, and on U-Boot that boot.scr spent the one try
    of slot `tried` (its console line after `since`); notes what was seen."""
    seen = check_committed_on_esp(vm, slot, other_bootable)
    if vm.arch == "aarch64":
        pattern = rf"racklet: trying slot {tried} \(0 tries left after this one\)"
        found = re.search(pattern, clean(vm.since(since)))
        check(found, f"{step}: the boot script never said /{pattern}/ on the console")
        seen = f"boot.scr said {found.group(0)!r}; {seen}"
    ctx.note(f"{step}: {seen}")


def reboot_seen(vm: NetVM, since: int) -> bool:
    return BOOT_LINE.search(vm.since(since)) is not None


def wait_for(vm: NetVM, what: str, predicate, timeout: float, interval: float = 3.0,
             reboot_ok: bool = False, since: int | None = None) -> dict | None:
    """Poll status until predicate(status) holds. With reboot_ok, a reboot of
    the guest (a new kernel command line after `since`) ends the wait: None."""
    deadline = time.monotonic() + timeout
    last = None
    mark = vm.cursor if since is None else since
    while time.monotonic() < deadline:
        if reboot_ok and reboot_seen(vm, mark):
            return None
        try:
            last = status(vm, timeout=60)
        except HarnessError as error:
            if reboot_ok and reboot_seen(vm, mark):
                return None
            last = {"error": str(error)[:300]}
            time.sleep(interval)
            continue
        if predicate(last):
            return last
        time.sleep(interval)
    description = summary(last) if last and "booted" in last else last
    raise TestFailure(f"{what}: not reached within {timeout:.0f} s; last status: {description}\n"
                      f"agent journal:\n{journal(vm) if vm.running() else '(VM down)'}")


def operation(report: dict) -> str:
    return report["state"]["operation"]["kind"]


def committed(report: dict, version: str) -> bool:
    booted = report["booted"]["slot"]
    view = slot_view(report, booted)
    return (report["booted"]["version"] == version and view["state"] == "good"
            and view["boot_state"] == "good" and operation(report) == "idle")


def wait_for_reboot(vm: NetVM, since: int, timeout: float) -> float:
    """Wait for the guest to reboot on its own (its next kernel command line).
    Returns the (monotonic) time that line arrived."""
    vm.cursor = since
    match = vm.expect(BOOT_LINE, timeout=timeout)
    vm.cursor = since  # boot_to_shell looks for this command line again
    return vm.started_at + vm.time_at(match.start())


MONITOR_SCRIPT = """#!/bin/bash
echo $$ > /run/rkmon.pid
# What the boot loader will do, fast: the new entry (systemd-boot) or the try
# in a U-Boot state copy is placed moments before the agent reboots. Only
# bash builtins in the fast loop: a fork and exec every 0.2 s (ls, tr, grep,
# sleep) took a third of a TCG guest's CPU and slowed the very update it watches.
exec {rk_sleep}<> <(:)
esp() {
  rk_esp=""
  local entry copy fields
  for entry in /efi/EFI/Linux/*; do [ -e "$entry" ] && rk_esp+="${entry##*/} "; done
  for copy in /efi/racklet/state-1.env /efi/racklet/state-2.env; do
    [ -r "$copy" ] || continue
    mapfile -d '' fields < "$copy"
    [[ " ${fields[*]} " == *" racklet_tries_b=1 "* ]] && { rk_esp+="uboot-try-b "; break; }
  done
}
( while :; do esp; echo "RKEFI $rk_esp RKEFIEND"; read -t 0.2 -u $rk_sleep; done ) &
echo $! > /run/rkmon-esp.pid
while :; do
  s=$(racklet-update --json status 2>/dev/null)
  esp
  echo "RKMON ${s//$'\\n'/} RKESP $rk_esp RKMONEND"
  read -t 1 -u $rk_sleep
done
"""# The guest's serial console (its kernel command line's console=).
SERIAL_CONSOLE = {"x86_64": "/dev/ttyS0", "aarch64": "/dev/ttyAMA0"}
MONITOR_LINE = re.compile(r"RKMON (\{[^\r\n]*\}) RKESP ([^\r\n]*?) RKMONEND")


def monitor_start(vm: NetVM) -> int:
    """Print status and the ESP's entries to the console every second from a
    guest background job, so that the harness can follow an update without
    typing. (Typing while the guest reboots by itself is not harmless: the
    bytes wait in the UART and the next reader is systemd-boot's menu, where
    they pick entries, print status, set the default...). Returns the buffer
    offset to read samples from. Nothing may be typed until the guest reboots
    or monitor_stop()."""
    write_file(vm, "/run/rkmon.sh", MONITOR_SCRIPT)
    mark = len(vm.output)
    console = SERIAL_CONSOLE[vm.arch]
    vm.run(f"chmod +x /run/rkmon.sh && setsid -f /run/rkmon.sh >{console} 2>&1 </dev/null")
    return mark


def monitor_stop(vm: NetVM) -> None:
    vm.run("kill $(cat /run/rkmon.pid /run/rkmon-esp.pid) 2>/dev/null; rm -f /run/rkmon*.pid; sleep 1.5")


def monitor_samples(vm: NetVM, since: int) -> list[tuple[dict, list[str], int]]:
    """(status, ESP entries, offset) of every readable sample after `since`
    (the UART drops bytes under load: damaged samples are skipped)."""
    samples = []
    for match in MONITOR_LINE.finditer(vm.since(since)):
        try:
            samples.append((json.loads(match.group(1)), match.group(2).split(), since + match.start()))
        except json.JSONDecodeError:
            continue
    return samples


def monitor_until(vm: NetVM, since: int, what: str, predicate, timeout: float,
                  reboot_ok: bool = True) -> tuple[dict, list[str]] | None:
    """Wait (reading only) for a sample with predicate(status, esp) true.
    With reboot_ok, a reboot (new kernel command line) ends the wait: None."""
    deadline = time.monotonic() + timeout
    checked = 0
    last = None
    while time.monotonic() < deadline:
        samples = monitor_samples(vm, since)
        for report, esp, _ in samples[checked:]:
            last = (report, esp)
            if predicate(report, esp):
                return report, esp
        checked = len(samples)
        if reboot_ok and reboot_seen(vm, since):
            return None
        if not vm.running():
            raise HarnessError(f"QEMU exited while waiting for {what}")
        time.sleep(0.3)
    raise TestFailure(f"{what}: not reached within {timeout:.0f} s; last sample: "
                      f"{summary(last[0]) + ' ESP ' + str(last[1]) if last else None}")


def check_delta_install(server: RepoServer, report: dict, source: str, version: str) -> str:
    """`version` was installed by delta from `source`: status says so, the
    patches were downloaded, the full root and hash tree were not."""
    last = report.get("last_install") or {}
    check(last.get("path") == "delta" and last.get("version") == version and last.get("from_version") == source,
          f"{version} should have been installed by delta from {source}: {last}")
    fetched = [r.path for r in server.target_requests() if f"-{version}-" in r.path]
    patches = [p for p in fetched if p.endswith(".zst-patch")]
    full = [p for p in fetched if p.endswith((FULL_ROOT_TARGET, "-verity.img.zst"))]
    check(patches and not full, f"a delta install downloads patches, not the full root or hash tree: {fetched}")
    check(last["downloaded_bytes"] < 0.05 * last["full_bytes"],
          f"the delta should be a small part of the full download: {last}")
    return (f"{len(patches)} patches, {last['downloaded_bytes']} of {last['full_bytes']} bytes "
            f"({100 * last['downloaded_bytes'] / last['full_bytes']:.2f} %), no full root or hash tree requested")


def install_and_time(ctx: Context, vm: NetVM, server: RepoServer, version: str, timeout: float = 1500) -> dict:
    """The agent (already triggered) downloads and writes `version`; follow the
    operation (monitor, no typing) until `installed` or the automatic reboot.
    Returns phase times in seconds from `started`. The monitor is left running
    only if the guest rebooted or will (auto_reboot)."""
    started = time.monotonic()
    mark = vm.cursor
    since = monitor_start(vm)
    seen: dict[str, float] = {}

    def follow(report: dict, esp: list[str]) -> bool:
        kind = operation(report)
        seen.setdefault(kind, time.monotonic() - started)
        error = report["state"].get("last_error")
        if kind == "idle" and error and "installing" in error.get("message", "") and "writing" in seen:
            raise TestFailure(f"install of {version} failed: {error}")
        return kind in ("installed", "trying")

    monitor_until(vm, since, f"install of {version}", follow, timeout)
    targets = [r for r in server.target_requests() if version in r.path and "manifest" not in r.path]
    download = None
    if targets:
        first = min(r.started for r in targets)
        last_end = max((r.finished or time.monotonic()) for r in targets)
        download = last_end - first
    return {"started": started, "until_writing": seen.get("writing"), "until_verifying": seen.get("verifying"),
            "until_installed": seen.get("installed"), "download_transfer": download,
            "bytes": sum(r.sent for r in targets), "mark": mark}


def report_install(ctx: Context, label: str, times: dict, reboot_at: float, committed_at: float,
                   outcome: str = "committed") -> None:
    ctx.phase(f"{label}: agent start -> writing (check, metadata)", times["until_writing"] or 0)
    ctx.phase(f"{label}: download of {times['bytes'] / 1e6:.0f} MB of targets (server side)",
              times["download_transfer"] or 0)
    if times["until_verifying"]:
        ctx.phase(f"{label}: agent start -> verifying (download + write)", times["until_verifying"])
    if times["until_installed"]:
        ctx.phase(f"{label}: agent start -> installed (+ verify, UKI)", times["until_installed"])
    ctx.phase(f"{label}: agent start -> reboot", reboot_at - times["started"])
    ctx.phase(f"{label}: reboot -> {outcome}", committed_at - reboot_at)


def var_token(vm: NetVM) -> str:
    token = f"e2e-{random.getrandbits(64):016x}"
    vm.run(f"mkdir -p /var/lib/e2e && echo {token} > /var/lib/e2e/token && sync")
    return token


def check_var_token(vm: NetVM, token: str) -> None:
    seen = vm.run("cat /var/lib/e2e/token", check=False)[1].strip()
    check(seen == token, f"/var lost the token written under version 1: {seen!r} != {token!r}")


def on_good_slot(report: dict, version: str) -> None:
    """The node runs `version` from a committed slot and is not mid-try."""
    booted = report["booted"]["slot"]
    view = slot_view(report, booted)
    check(report["booted"]["version"] == version, f"booted {report['booted']['version']}, expected {version}")
    check(view["boot_state"] == "good" and view["state"] == "good",
          f"booted slot {booted} is not committed: {summary(report)}")
    if operation(report) == "idle":
        check(report.get("next_boot") == booted,
              f"with nothing pending, slot {booted} should boot next: {summary(report)}")


def other_not_bootable(report: dict) -> None:
    other = "b" if report["booted"]["slot"] == "a" else "a"
    view = slot_view(report, other)
    check(view["boot_state"] in ("absent", "bad") and view["state"] in ("unbootable", "empty", "bad"),
          f"slot {other} must not be bootable after a refused update: {summary(report)}")


# A byte of the root's erofs superblock (block 0): read by the first mount, so
# dm-verity resets the machine early in each boot of a slot whose root holds it.
SUPERBLOCK_BYTE = 1024 + 100


def corrupt_root(vm: NetVM, slot: str) -> str:
    """Flip one byte of slot's root partition from inside the guest (bit rot on
    the card) and flush it; returns what was written."""
    device = f"/dev/disk/by-partlabel/root-{slot}"
    original = vm.run(f"dd if={device} bs=1 skip={SUPERBLOCK_BYTE} count=1 status=none | od -An -tx1").strip()
    new, octal = ("a5", "245") if original == "5a" else ("5a", "132")
    vm.run(f"printf '\\{octal}' | dd of={device} bs=1 seek={SUPERBLOCK_BYTE} count=1 conv=notrunc,fsync status=none")
    seen = vm.run(f"dd if={device} bs=1 skip={SUPERBLOCK_BYTE} count=1 status=none | od -An -tx1").strip()
    check(seen == new, f"the flipped byte did not land in {device}: {original} -> {seen}, expected {new}")
    return f"root-{slot} byte {SUPERBLOCK_BYTE}: {original} -> {new}"


def failed_boots(vm: NetVM, slot: str, count: int) -> list[str]:
    """`count` boots of `slot` in a row, each stopped by dm-verity before any
    login; returns what the kernel said each time."""
    said = []
    for boot in range(1, count + 1):
        line = vm.expect(BOOT_LINE, timeout=400)
        check(f".slot={slot}" in line.group(1), f"failed boot {boot}: expected slot {slot}: {line.group(1)}")
        corrupted = vm.expect(VERITY_CORRUPTION, timeout=300, fail=AUTOLOGIN)
        said.append(corrupted.group(0).strip())
    return said


def committed_entry(entries: list[str], slot: str) -> bool:
    """systemd-boot: slot has a committed UKI with boots left, counted
    (racklet-<slot>+3.efi, +2-1, +1-2) or not yet (racklet-<slot>.efi)."""
    return any(committed_uki_slot(entry) == slot for entry in entries)


# ---------------------------------------------------------------------------
# The scenario


@test("x86_64", "aarch64")
def e2e_update_scenario(ctx: Context) -> None:
    """v1 -> v2 found and committed, /var kept, rollback to v1 and back, v3
    fails its health gate and falls back to v2, is not retried, and rollback
    onto the failed slot is refused."""
    builds = ctx.builds
    v1, v2, v3 = (builds.version(n) for n in ("v1", "v2", "v3"))
    # Published with deltas: step 1 goes by delta, step 5 falls back to the
    # full download from a tampered patch.
    repo, server = ctx.repo("v1", "v2", deltas=True)
    started = time.monotonic()
    vm = ctx.node(server)
    ctx.phase("v1 at the shell", time.monotonic() - started)
    token = var_token(vm)
    report = status(vm)
    on_good_slot(report, v1)

    # 1. The agent finds 2, writes slot B, reboots, 2 passes its gate and is committed.
    #    Its state file is unusable first (garbage on x86_64, a newer agent's
    #    schema on aarch64): it is kept aside, the state rebuilt, and the update
    #    goes on.
    broken = "{ not json" if vm.arch == "x86_64" else '{"schema": 99, "operation": {"kind": "idle"}}'
    vm.run("systemctl stop racklet-update", timeout=120)
    write_file(vm, "/var/lib/racklet/update/state.json", broken)
    configure_agent(vm, auto=True, interval=60)
    report = status(vm)
    aside = report.get("state_set_aside") or {}
    check(aside.get("kept_as") and "state.json" in aside["kept_as"] and aside.get("reason"),
          f"status should report the state file kept aside: {report.get('state_set_aside')}")
    kept = vm.run(f"cat {aside['kept_as']}").strip()
    check(kept == broken, f"the kept file should hold what was there: {kept!r}")
    ctx.note(f"step 1: state file {broken!r} set aside: {aside['reason'][:120]} (kept as {aside['kept_as']})")
    mark = vm.cursor
    times = install_and_time(ctx, vm, server, v2)
    reboot_at = wait_for_reboot(vm, mark, timeout=300)
    boot_to_shell(vm, "b")
    report = wait_for(vm, f"{v2} committed", lambda r: committed(r, v2), timeout=400, interval=1)
    report_install(ctx, "v2", times, reboot_at, time.monotonic())
    check(slot_view(report, "a") == {"boot_state": "good", "state": "good", "version": v1, "booted": False},
          f"slot A should hold {v1}, good: {summary(report)}")
    boot_loader_committed(ctx, vm, "step 1", "b", other_bootable=True, tried="b", since=mark)
    ctx.note(f"step 1: {summary(report)}")
    ctx.note(f"step 1 by delta: {check_delta_install(server, report, v1, v2)}")

    # 2. /var survived.
    check_var_token(vm, token)

    # 4 (before 3, which overwrites slot A). Manual rollback to 1, then back to 2.
    configure_agent(vm, auto=False)  # or the agent on 1 would reinstall 2 into B at once
    # The reboot may kill the shell before it prints the command's end: type it
    # and follow the console instead of waiting for the command.
    mark = vm.cursor
    vm.reboot("racklet-update rollback --reboot")
    started = time.monotonic()
    boot_to_shell(vm, "a")
    message = re.search(r"slot a \([^)]*\) boots next", vm.output[mark:])
    ctx.note(f"rollback --reboot said: {message.group(0) if message else '(not seen)'}")
    report = wait_for(vm, f"{v1} booted after rollback", lambda r: r["booted"]["version"] == v1, timeout=120)
    on_good_slot(report, v1)
    check(slot_view(report, "b")["version"] == v2 and slot_view(report, "b")["state"] == "good",
          f"after the rollback slot B should still hold {v2}, good: {summary(report)}")
    ctx.phase("rollback --reboot -> v1 up", time.monotonic() - started)
    check_var_token(vm, token)
    esp = check_committed_on_esp(vm, "a", other_bootable=True)
    ctx.note(f"step 4 rollback: {summary(report)}; {esp}")
    vm.reboot("racklet-update rollback --reboot")
    boot_to_shell(vm, "b")
    report = wait_for(vm, f"{v2} booted again", lambda r: r["booted"]["version"] == v2, timeout=120)
    on_good_slot(report, v2)
    check_committed_on_esp(vm, "b", other_bootable=True)
    # Its boots counted afresh only once the agent confirmed this one (the
    # gate passed): what step 5 counts down from.
    waited = wait_for_boot_confirmed(vm, "b")
    ctx.phase("B up -> its boot confirmed (gate)", waited)

    # 5. The committed slot's root rots on the card: B fails to start three
    #    times, the boot loader falls back to A's good 1 without help, the
    #    agent names slot B and repairs it (2 installed into B again).
    configure_agent(vm, auto=True, interval=60)
    flipped = corrupt_root(vm, "b")
    # And the link is flaky: the root's download is cut three times. The
    # delta from 1 (what A runs) is tampered with on the server: the agent
    # refuses the patch and falls back to the full download.
    repair_requests = len(server.target_requests())
    patch = repo.target_path(v2, f"from-{v1}-root")
    tampered = bytearray((repo.path / patch.lstrip("/")).read_bytes())
    tampered[len(tampered) // 2] ^= 0xFF
    server.override[patch] = bytes(tampered)
    server.cut_paths, server.cut_after, server.cuts_left = FULL_ROOT_TARGET, 24 << 20, 3
    mark = vm.cursor
    started = time.monotonic()
    vm.reboot()
    said = failed_boots(vm, "b", COMMITTED_BOOT_TRIES)
    boot_to_shell(vm, "a")
    ctx.phase("corrupted B: three failed boots -> A up", time.monotonic() - started)
    if vm.arch == "aarch64":
        skipped = re.search(r"racklet: committed slot b failed to start \d+ times in a row; skipping it",
                            clean(vm.since(mark)))
        check(skipped, "boot.scr never said that it skipped slot b")
    report = status(vm)
    failed = report["state"].get("failed_slot") or {}
    check(report["booted"]["slot"] == "a" and report["booted"]["version"] == v1,
          f"after B failed to start, A ({v1}) should run: {summary(report)}")
    check(failed.get("slot") == "b" and failed.get("version") == v2,
          f"status should name slot b ({v2}) as failed to start: {report['state'].get('failed_slot')}")
    check(report["state"].get("slot_start_failures_total") == 1, f"slot_start_failures_total: {summary(report)}")
    logged = vm.run("journalctl -b -u racklet-update --no-pager | grep -c 'committed slot b failed to start'",
                    check=False)[1].strip()
    check(logged not in ("", "0"), "the journal does not name the slot that failed to start")
    ctx.note(f"step 5: {flipped}; kernel each time: {said[0]}; status: failed_slot {failed}")
    times = install_and_time(ctx, vm, server, v2)
    reboot_at = wait_for_reboot(vm, times["mark"], timeout=300)
    boot_to_shell(vm, "b")
    report = wait_for(vm, f"{v2} repaired and committed", lambda r: committed(r, v2), timeout=400, interval=1)
    report_install(ctx, "repair of B", times, reboot_at, time.monotonic())
    check(report["state"].get("failed_slot") is None, f"the repaired slot is still named: {summary(report)}")
    fallback = report.get("last_install") or {}
    check(fallback.get("path") == "full" and fallback.get("version") == v2
          and any(word in json.dumps(fallback.get("reason")) for word in ("sha256", "hash")),
          f"the tampered patch should be refused and {v2} installed by the full download: {fallback}")
    check(any(r.path == patch for r in server.target_requests()[repair_requests:]),
          f"the agent never asked for the patch {patch}")
    ctx.note(f"step 5: tampered patch refused: {fallback['reason']['message'][:200]}")
    roots = [r for r in server.target_requests()[repair_requests:] if r.path.endswith(FULL_ROOT_TARGET)]
    size = len(server.content(roots[0].path)) if roots else 0
    sent = sum(r.sent for r in roots)
    check(len(roots) == 4 and sum(not r.complete for r in roots) == 3 and all(r.status == 206 for r in roots[1:])
          and sent < 1.5 * size, f"the root's download should be cut 3 times and resumed with range requests: "
          f"{roots} ({sent} of {size} bytes sent)")
    server.reset()
    ctx.note(f"step 5 download: {len(roots)} requests, {sum(r.status == 206 for r in roots)} range requests, "
             f"{sent} bytes sent for a {size}-byte root ({sent / size:.2f}x)")
    check(slot_view(report, "a") == {"boot_state": "good", "state": "good", "version": v1, "booted": False},
          f"slot A should still hold {v1}, good: {summary(report)}")
    check_committed_on_esp(vm, "b", other_bootable=True)
    check_var_token(vm, token)
    ctx.note(f"step 5 repaired: {summary(report)}")

    # 3. 3 is published; installed into A; fails its gate; back to 2 by itself.
    repo.publish("v3", deltas=True)
    configure_agent(vm, auto=True, interval=60)
    mark = vm.cursor
    times = install_and_time(ctx, vm, server, v3)
    started = wait_for_reboot(vm, mark, timeout=300)
    vm.cursor = mark
    cmdline = vm.expect(BOOT_LINE, timeout=300)
    check(".slot=a" in cmdline.group(1), f"v3's try should boot slot A: {cmdline.group(1)}")
    # The try of 3 (slot A), its health gate failing, and the reboot back to B
    # (the try's second command line, if both survived, is skipped).
    second = vm.expect(BOOT_LINE, timeout=600, fail=BOOT_FAILURE)
    deadline = time.monotonic() + 600
    while ".slot=a" in second.group(1) and not AUTOLOGIN.search(vm.output, cmdline.end(), second.start()):
        second = vm.expect(BOOT_LINE, timeout=max(1, deadline - time.monotonic()), fail=BOOT_FAILURE)
    check(".slot=b" in second.group(1), f"after 3's failed gate, expected slot B: {second.group(1)}")
    vm.cursor = second.start()
    boot_to_shell(vm, "b")
    report = wait_for(vm, f"back on {v2}", lambda r: r["booted"]["version"] == v2 and operation(r) == "idle",
                      timeout=120)
    report_install(ctx, "v3", times, started, time.monotonic(), "try, gate fails, back on v2")
    on_good_slot(report, v2)
    failed = {f["version"]: f["reason"] for f in report["state"]["failed_versions"]}
    check(v3 in failed, f"{v3} is not recorded as failed: {summary(report)}")
    check("health" in failed[v3], f"the reason for {v3} should name the health gate: {failed[v3]!r}")
    check(slot_view(report, "a")["state"] == "bad", f"slot A (3) should be bad: {summary(report)}")
    # Not just in the agent's record: the boot loader must never boot the
    # failed 3 again (systemd-boot: no racklet-a.efi that systemd-bless-boot
    # could have blessed; U-Boot: A out of the order, B committed).
    check(slot_view(report, "a")["boot_state"] in ("bad", "absent"),
          f"the failed {v3} is bootable ({slot_view(report, 'a')['boot_state']}): {summary(report)}")
    boot_loader_committed(ctx, vm, "step 3", "b", other_bootable=False, tried="a", since=mark)
    check_var_token(vm, token)
    ctx.note(f"step 3: {summary(report)}")
    # Not tried again: a new check (agent restart = immediate tick) installs nothing.
    before = len(server.target_requests())
    mark = vm.cursor
    vm.run("systemctl restart racklet-update", timeout=120)
    time.sleep(20)
    report = status(vm)
    check(not reboot_seen(vm, mark), "the agent rebooted after the restart")
    check(operation(report) == "idle", f"3 must not be retried: {summary(report)}")
    fetched = [r.path for r in server.target_requests()[before:] if "manifest" not in r.path]
    check(not fetched, f"3 must not be downloaded again: {fetched}")
    ctx.note(f"after restart: last check {report['state']['last_check']}")
    # Rollback onto the failed 3 is refused, with a reason.
    code, result = cli_json(vm, "rollback", timeout=60)
    check(code != 0, f"rollback onto slot A (failed {v3}) must be refused: {result}")
    ctx.note(f"rollback onto the failed slot: exit {code}: {result if isinstance(result, str) else result.get('error')}")

    # 6. Now B rots too, with A bad (3 failed): no slot can start. The node
    #    stops on a console message instead of resetting forever.
    flipped = corrupt_root(vm, "b")
    mark = vm.cursor
    vm.reboot()
    failed_boots(vm, "b", COMMITTED_BOOT_TRIES)
    if vm.arch == "aarch64":
        stopped = vm.expect(r"racklet: STOPPED: no slot can be started[^\r\n]*", timeout=120, fail=BOOT_LINE)
    else:
        # systemd-boot boots the used-up entry once more; racklet-init stops it.
        line = vm.expect(BOOT_LINE, timeout=400)
        check(".slot=b" in line.group(1), f"expected the used-up slot b: {line.group(1)}")
        stopped = vm.expect(r"racklet-init: FATAL: STOPPED: no slot can be started[^\r\n]*", timeout=300,
                            fail=VERITY_CORRUPTION)
    quiet_from = len(vm.output)
    time.sleep(15)
    check(not BOOT_LINE.search(vm.since(quiet_from)) and not AUTOLOGIN.search(vm.since(quiet_from)),
          "the node booted again after it said it stopped")
    ctx.note(f"step 6: {flipped}; then: {clean(stopped.group(0))[:200]}")
    vm.kill()


# ---------------------------------------------------------------------------
# Waves


@test()
def e2e_waves(ctx: Context) -> None:
    """A node outside the open wave reports the update and its start time and
    does not install it; a node inside the wave sees it available."""
    v2 = ctx.builds.version("v2")
    repo, server = ctx.repo("v1")
    repo.publish("v2", "--wave", "1000@+0h", "--wave", "2048@+1d")
    vm = ctx.node(server)
    vm.run("mkdir -p /var/lib/racklet/update && echo 1500 > /var/lib/racklet/update/seed")
    configure_agent(vm, auto=True, interval=3600)
    code, result = cli_json(vm, "check", timeout=120)
    check(code == 0 and isinstance(result, dict), f"check failed ({code}): {result}")
    check(result.get("seed") == 1500, f"seed {result.get('seed')} (wrote 1500)")
    check(result.get("result") == "not-yet" and result.get("version") == v2 and result.get("wave_start"),
          f"seed 1500 is outside the open wave (<1000): {result}")
    time.sleep(15)
    report = status(vm)
    check(operation(report) == "idle", f"the update must not start: {summary(report)}")
    check(slot_view(report, "b")["state"] in ("empty", "unknown"), f"slot B touched: {summary(report)}")
    last_check = report["state"]["last_check"] or {}
    check(last_check.get("available_version") == v2 and "wave" in last_check.get("result", ""),
          f"status should report {v2} and its wave: {last_check}")
    fetched = [r.path for r in server.target_requests() if "manifest" not in r.path]
    check(not fetched, f"nothing may be downloaded outside the wave: {fetched}")
    ctx.note(f"seed 1500: {result.get('message')} (start {result.get('wave_start')})")
    # Inside the wave.
    configure_agent(vm, auto=False, restart=False)
    vm.run("echo 500 > /var/lib/racklet/update/seed && systemctl restart racklet-update", timeout=120)
    code, result = cli_json(vm, "check", timeout=120)
    check(code == 0 and isinstance(result, dict) and result.get("result") == "available"
          and result.get("seed") == 500, f"seed 500 is inside the open wave: {result}")
    ctx.note(f"seed 500: {result.get('message')}")
    check(vm.poweroff() == 0, "QEMU did not exit cleanly after poweroff")


# ---------------------------------------------------------------------------
# Power cuts

MOMENTS = ["write", "placed", "firstboot"]


def power_cut(ctx: Context, moment: str, rng: random.Random, label: str) -> str:
    """One cut at `moment`; returns what happened. Fresh overlay of v1, repo
    with v1 and v2, the agent on automatic."""
    v2 = ctx.builds.version("v2")
    repo_dir = ctx.dir / "repo"
    if not repo_dir.exists():
        ctx.repo("v1", "v2")
    server = ctx.servers[0]
    vm = ctx.node(server, label=label)
    token = var_token(vm)
    # "placed": the agent does not reboot by itself, so the cut falls between
    # the entry being placed and the reboot (with auto_reboot the two can be
    # too close for the harness to aim between them).
    configure_agent(vm, auto=True, interval=60, reboot=moment != "placed")
    mark = vm.cursor
    since = monitor_start(vm)
    what = ""
    if moment == "write":
        fraction = rng.uniform(0.05, 0.95)
        report, _ = monitor_until(
            vm, since, "writing", lambda r, e: operation(r) == "writing" and r["progress"]["total"]
            and r["progress"]["bytes"] >= fraction * r["progress"]["total"], timeout=900, reboot_ok=False)
        what = (f"while writing, at {report['progress']['bytes']} of {report['progress']['total']} bytes "
                f"(aimed at {fraction:.0%})")
    elif moment == "placed":
        deadline = time.monotonic() + 1500
        pattern = re.compile(r"(?:RKEFI|RKESP) ([^\r\n]*?)(?:RKEFIEND|RKMONEND)")
        entries = None
        while entries is None:
            check(time.monotonic() < deadline, "the new entry was never placed")
            for match in pattern.finditer(vm.since(since)):
                if try_placed(match.group(1).split()):
                    entries = match.group(1).split()
                    break
            else:
                check(not reboot_seen(vm, since), "the guest rebooted before the new entry was seen")
                time.sleep(0.1)
        delay = rng.uniform(0, 1.5)
        time.sleep(delay)
        what = f"{delay:.2f} s after the monitor saw the try of B placed ({entries})"
    else:
        wait_for_reboot(vm, mark, timeout=1500)
        vm.expect(BOOT_LINE, timeout=300)
        delay = rng.uniform(0, 10)  # the commit comes some 12 s into that boot
        time.sleep(delay)
        what = f"{delay:.1f} s into the first boot of slot B"
    vm.sigkill()
    vm.note(f"power cut {what}")
    # Power back on.
    vm.cursor = len(vm.output)
    boot = boot_to_shell(vm)
    report = status(vm)
    booted_version = report["booted"]["version"]
    view = slot_view(report, report["booted"]["slot"])
    check(view["boot_state"] in ("good", "trying (0 tries left)") and view["state"] in ("good", "trying"),
          f"after the cut the machine runs an uncommitted slot: {summary(report)}")
    check_var_token(vm, token)
    after_cut = summary(report)
    if moment == "placed" and report["booted"]["slot"] == "a":
        # The entry did not outlive the cut: the agent installs again, and
        # this time it may reboot by itself.
        configure_agent(vm, auto=True, interval=60)
    # The agent completes (or restarts) the update: 2 ends up committed.
    # Followed by the monitor only: the agent may reboot at any moment.
    deadline = time.monotonic() + 1500  # as much as a first install gets
    boots = 0
    while True:
        check(time.monotonic() < deadline, f"{v2} not committed after the cut ({what})")
        mark = vm.cursor
        since = monitor_start(vm)
        found = monitor_until(vm, since, f"{v2} committed after the cut ({what})",
                              lambda r, e: committed(r, v2), timeout=max(60, deadline - time.monotonic()))
        if found is not None:
            report = found[0]
            break
        boots += 1
        check(boots <= 3, f"{boots} reboots after the cut ({what}) without committing {v2}")
        vm.cursor = since
        boot_to_shell(vm)
    monitor_stop(vm)
    check_var_token(vm, token)
    vm.kill()
    return (f"cut {what}; booted slot {boot['slot']} ({booted_version}): {after_cut}; then {v2} committed "
            f"after {boots} more reboot(s)")


@test("x86_64", "aarch64")
def e2e_power_cuts(ctx: Context) -> None:
    """SIGKILL QEMU while the update is written, just after the new entry is
    placed, and during the first boot of the new slot: a good slot boots, /var is
    intact, and the agent completes the update. --count N: N random cuts."""
    rng = random.Random(ctx.options.seed)
    count = ctx.options.count
    kinds = ctx.options.moment or MOMENTS
    moments = kinds if count is None else [rng.choice(kinds) for _ in range(count)]
    results = []
    for index, moment in enumerate(moments):
        started = time.monotonic()
        try:
            outcome = power_cut(ctx, moment, rng, f"cut{index}-{moment}")
        except Exception as error:  # noqa: BLE001
            results.append(False)
            print(f"FAIL cut {index} ({moment}, {time.monotonic() - started:.0f} s): {error}", flush=True)
            print(f"     serial log: {ctx.vms[-1].log_path if ctx.vms else '-'}", flush=True)
        else:
            results.append(True)
            print(f"ok   cut {index} ({moment}, {time.monotonic() - started:.0f} s): {outcome}", flush=True)
        finally:
            if ctx.vms:
                ctx.vms[-1].close()
    passed = sum(results)
    ctx.options.cut_results = results
    print(f"power cuts: {passed} passed, {len(results) - passed} failed", flush=True)
    check(all(results), f"{len(results) - passed} of {len(results)} power cuts failed")


def test_ca(directory: Path, ip: str) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for `ip` it signed: (CA
    certificate, server certificate, server key), PEM, made with openssl."""
    ca_key, ca_cert = directory / "ca.key", directory / "ca.pem"
    key, request, cert = directory / "server.key", directory / "server.csr", directory / "server.pem"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    quiet = {"check": True, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    subprocess.run(["openssl", "req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca_cert), "-days", "2",
                    "-subj", "/CN=Racklet e2e test CA", "-addext", "basicConstraints=critical,CA:TRUE",
                    "-addext", "keyUsage=critical,keyCertSign,cRLSign"], **quiet)
    subprocess.run(["openssl", "req", "-new", *ec, "-keyout", str(key), "-out", str(request),
                    "-subj", f"/CN={ip}"], **quiet)
    extensions = directory / "server.ext"
    extensions.write_text(f"subjectAltName=IP:{ip}\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n")
    subprocess.run(["openssl", "x509", "-req", "-in", str(request), "-CA", str(ca_cert), "-CAkey", str(ca_key),
                    "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(extensions)], **quiet)
    return ca_cert, cert, key


HTTPS_CONFIG = """\
metadata_url = "{scheme}://10.0.2.100/metadata/"
targets_url = "{scheme}://10.0.2.100/targets/"
allow_insecure_http = false
{ca}"""
NODE_CA_PATH = "/etc/racklet/update-ca.pem"


@test()
def e2e_https_with_a_test_ca(ctx: Context) -> None:
    """Issue 15 (4): the repository over HTTPS, its certificate from a
    throwaway CA: refused (naming the certificate problem) until the node
    trusts the CA through extra_ca_certificates, then 2.0.0 installs over
    HTTPS; a plain http:// URL to another machine with allow_insecure_http =
    false is refused naming the setting."""
    import ssl
    repo, server = ctx.repo("v1", "v2")
    ca, cert, key = test_ca(ctx.dir, "10.0.2.100")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    tls = RepoServer(repo.path, tls=context)
    ctx.servers.append(tls)
    vm = ctx.node(server, tls_port=tls.port)
    configure_agent(vm, auto=False, restart=False)
    wait_for_network(vm)
    base = vm.run("cat /etc/racklet/update.toml")

    def agent_config(scheme: str, ca: str = "") -> None:
        # Top-level keys before the base's [health] table.
        write_file(vm, "/etc/racklet/update.toml", HTTPS_CONFIG.format(scheme=scheme, ca=ca) + base)
        vm.run("systemctl restart racklet-update", timeout=120)

    # Not trusted yet: the system's store does not hold the test CA.
    agent_config("https")
    code, result = cli_json(vm, "check", timeout=300)
    text = json.dumps(result) if isinstance(result, dict) else result
    ctx.note(f"https, CA not trusted: check exited {code}: {text[:300]}")
    check(code != 0 and "certificate" in text.lower(), f"an untrusted certificate should fail the check: {text}")
    # Trusted through extra_ca_certificates: the update installs over HTTPS.
    write_file(vm, NODE_CA_PATH, ca.read_text())
    agent_config("https", f'extra_ca_certificates = "{NODE_CA_PATH}"\n')
    asked_before = len(server.requests)
    code, result = cli_json(vm, "apply", timeout=1500)
    report = status(vm)
    check(code == 0 and operation(report) == "installed" and slot_view(report, "b")["version"] == "2.0.0",
          f"apply over HTTPS: exit {code}: {result}; {summary(report)}")
    over_tls = [r for r in tls.target_requests() if r.complete]
    check(over_tls and len(server.requests) == asked_before,
          f"the targets should come over TLS only: {len(over_tls)} TLS requests, "
          f"{len(server.requests) - asked_before} plain")
    ctx.note(f"https with the test CA: 2.0.0 installed; {len(tls.requests)} TLS requests "
             f"({sum(r.sent for r in over_tls) / 1e6:.0f} MB of targets)")
    # Plain http:// to another machine, not allowed.
    agent_config("http")
    report = status(vm)
    error = report.get("config_error") or ""
    ctx.note(f"plain http with allow_insecure_http = false: config_error: {error[:300]}")
    check("allow_insecure_http" in error and "http://10.0.2.100" in error,
          f"status should name the setting and the URL: config_error {error!r}")


STICK_LABEL = "racklet-stick"
STICK_MOUNT = "/run/racklet-stick"


@test()
def e2e_offline_install_from_a_copy(ctx: Context) -> None:
    """Issue 17 (3): the published repository copied to a second disk (a USB
    stick), no repository server at all: `apply --from` refuses the copy while
    its metadata looks expired (node clock +10 days), then installs 2.0.0
    from it, which passes its health gate and is committed."""
    repo, server = ctx.repo("v1", "v2")
    stick = ctx.dir / "stick.img"
    size = sum(f.stat().st_size for f in repo.path.rglob("*") if f.is_file())
    with open(stick, "wb") as handle:
        handle.truncate(size + size // 5 + 64 * 1024 * 1024)
    copy = ctx.dir / "stick"
    shutil.copytree(repo.path, copy / "repo")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", STICK_LABEL, "-d", str(copy), str(stick)], check=True)
    shutil.rmtree(copy)
    vm = ctx.node(server, extra_args=["-drive", f"if=none,id=stick,format=raw,readonly=on,file={stick}",
                                      "-device", "virtio-blk-pci,drive=stick"])
    # (cold boot: the saved state has no second disk)
    configure_agent(vm, auto=False)
    # Offline: the server answers nothing from here on (and counts what it is asked).
    server.down = True
    asked_before = len(server.requests)
    vm.run(f"mkdir -p {STICK_MOUNT} && mount -o ro \"$(blkid -L {STICK_LABEL})\" {STICK_MOUNT}")
    listing = vm.run(f"ls {STICK_MOUNT}/repo").split()
    check("metadata" in listing and "targets" in listing, f"the stick's repo/: {listing}")
    # The copy seen from a clock past its timestamp's expiry: refused.
    vm.run(f"date -u -s @{int(time.time()) + 10 * 86400}")
    report = refused(ctx, vm, "1.0.0", ["expire"], "apply --from with the node clock +10 days",
                     command=f"apply --from {STICK_MOUNT}/repo")
    vm.run(f"date -u -s @{int(time.time())}")
    check(slot_view(report, "b")["version"] is None, f"nothing should be written after the refusal: {summary(report)}")
    # Then installed from it, rebooted, gated and committed.
    mark = vm.cursor
    started = time.monotonic()
    vm.reboot(f"racklet-update apply --from {STICK_MOUNT}/repo --reboot")
    reboot_at = wait_for_reboot(vm, mark, timeout=900)
    during_install = [r for r in server.requests[asked_before:] if r.started < reboot_at]
    boot_to_shell(vm, "b")
    ctx.phase("apply --from -> B up", time.monotonic() - started)
    report = wait_for(vm, "2.0.0 committed from the copy", lambda r: committed(r, "2.0.0"), timeout=400)
    ctx.phase("apply --from -> committed", time.monotonic() - started)
    check(slot_view(report, "a")["version"] == "1.0.0", f"slot A should still hold 1.0.0: {summary(report)}")
    # The server answered nothing (each connection cut): the install can only
    # have come from the copy. The agent's timer still tried its configured
    # repository now and then (a failed check is retried), never for a target.
    targets = [r for r in during_install if r.path.startswith("/targets/")]
    check(not targets and all(r.status == -1 for r in during_install),
          f"the repository server was asked for targets or answered during the install: {during_install[:3]}")
    said = re.search(r"installing 2\.0\.0|2\.0\.0", vm.output[mark:])
    ctx.note(f"offline: the server down, {len(during_install)} metadata requests of the timer's checks cut "
             f"during the install, no target asked")
    ctx.note(f"offline: refused with the clock +10 days, then 2.0.0 committed from the copy "
             f"({size / 1e6:.0f} MB on the stick){'' if said else ' (the CLI printed nothing)'}; {summary(report)}")


# ---------------------------------------------------------------------------
# Attacks and faults


def manual_node(ctx: Context, server: RepoServer, disk: str = "v1", block=None) -> NetVM:
    """A node booted from `disk` into slot A, talking to `server`, its agent
    configured to act only when told (`apply`, `check`)."""
    vm = ctx.node(server, disk, block=block)
    configure_agent(vm, auto=False, interval=3600)
    return vm


def attack_setup(ctx: Context, *published: str, disk: str = "v1", block=None) -> tuple[Repo, RepoServer, NetVM]:
    repo, server = ctx.repo(*published)
    return repo, server, manual_node(ctx, server, disk, block)


def refused(ctx: Context, vm: NetVM, running: str, words: list[str], what: str, command: str = "apply") -> dict:
    """`command` (an apply) must fail; the node stays on its good slot with a
    reason naming one of `words`."""
    started = time.monotonic()
    code, result = cli_json(vm, command, timeout=1500)
    elapsed = time.monotonic() - started
    report = status(vm)
    text = json.dumps(report["state"].get("last_error")) + json.dumps(report["state"].get("last_check")) + \
        (result if isinstance(result, str) else result.get("_raw", ""))
    ctx.note(f"{what}: apply exited {code} after {elapsed:.0f} s; {summary(report)}")
    check(code != 0, f"{what}: apply succeeded: {result}")
    on_good_slot(report, running)
    check(operation(report) == "idle", f"{what}: operation {operation(report)}")
    check(not any(e.startswith(("racklet-b+", "racklet-b.")) for e in esp_entries(vm)),
          f"{what}: a slot-B entry is on the ESP: {esp_entries(vm)}")
    check(any(word.lower() in text.lower() for word in words),
          f"{what}: the reason should mention one of {words}: {text}")
    return report


@test("x86_64", "aarch64")
def e2e_delta_from_another_version(ctx: Context) -> None:
    """A node whose booted root is no delta's source installs the full
    update: 2 published without deltas, 3 with a delta from 2 only; the node
    runs 1, so it downloads 3's full root, and status says why."""
    v3 = ctx.builds.version("v3")
    repo, server = ctx.repo("v1", "v2")
    repo.publish("v3", "--delta-sources", "1", deltas=True)
    vm = manual_node(ctx, server)
    code, result = cli_json(vm, "apply", timeout=1500)
    check(code == 0, f"apply of {v3} failed ({code}): {result}")
    report = status(vm)
    check(operation(report) == "installed" and slot_view(report, "b")["version"] == v3,
          f"{v3} should be installed in slot B: {summary(report)}")
    last = report.get("last_install") or {}
    reason = last.get("reason") or {}
    check(last.get("path") == "full" and reason.get("code") == "no-delta-for-this-root",
          f"a full install, because no delta starts from 1: {last}")
    fetched = [r.path for r in server.target_requests()]
    check(any(p.endswith("deltas.json") for p in fetched), f"the delta index was never fetched: {fetched}")
    check(not any(p.endswith(".zst-patch") for p in fetched), f"a patch was downloaded: {fetched}")
    check(any(p.endswith(f"-{v3}{FULL_ROOT_TARGET}") for p in fetched), f"{v3}'s full root was not downloaded")
    ctx.note(f"status: {reason.get('message')}")
    check(vm.poweroff() == 0, "QEMU did not exit cleanly after poweroff")


@test()
def e2e_attack_modified_target(ctx: Context) -> None:
    """A target modified on the server (same length) is refused."""
    repo, server, vm = attack_setup(ctx, "v1", "v2")
    path = repo.target_path("2.0.0", "verity")
    data = bytearray((repo.path / path.lstrip("/")).read_bytes())
    data[len(data) // 2] ^= 0xFF
    server.override[path] = bytes(data)
    refused(ctx, vm, "1.0.0", ["hash", "sha256", "digest", "checksum"], "modified verity target")


@test()
def e2e_attack_longer_target(ctx: Context) -> None:
    """A target longer than its signed length is refused."""
    repo, server, vm = attack_setup(ctx, "v1", "v2")
    server.extra[repo.target_path("2.0.0", "verity")] = b"\0" * 65536
    refused(ctx, vm, "1.0.0", ["length", "longer", "size", "too large", "exceed"], "verity target + 64 KiB")


@test()
def e2e_attack_replayed_metadata(ctx: Context) -> None:
    """Metadata replayed from an older repository version (after the node saw a
    newer one) is refused as a rollback."""
    repo, server = ctx.repo("v1")
    old = repo.metadata()
    repo.publish("v2")
    vm = manual_node(ctx, server)
    code, result = cli_json(vm, "check", timeout=120)
    check(code == 0 and isinstance(result, dict) and result.get("result") == "available",
          f"the node should first see 2.0.0: {result}")
    # Serve the old timestamp (and what it points to) in place of the new ones.
    for path, data in old.items():
        if path.endswith(("timestamp.json", "snapshot.json", "targets.json")):
            server.override[path] = data
    code, result = cli_json(vm, "check", timeout=120)
    ctx.note(f"check with replayed metadata: exit {code}: {result if isinstance(result, str) else result.get('message')}")
    check(code != 0 or (isinstance(result, dict) and result.get("result") == "error"),
          f"a replayed older timestamp must be an error, not a result: {result}")
    refused(ctx, vm, "1.0.0", ["rollback", "older", "replay", "version"], "replayed metadata")


@test()
def e2e_attack_expired_metadata_then_clock_back(ctx: Context) -> None:
    """Issue 14 (c): the node's clock a year ahead (a spoofed NTP answer):
    the repository's metadata (timestamp: 7 days) looks expired and is
    refused, and that clock reading is not remembered. (The publisher refuses
    to write already-expired metadata, so the node's clock moves instead.)
    Then the clock comes back: the agent's own timer installs the update,
    with no person deleting anything."""
    repo, server, vm = attack_setup(ctx, "v1", "v2")
    year_ahead = int(time.time()) + 365 * 86400
    vm.run(f"date -u -s @{year_ahead}")
    refused(ctx, vm, "1.0.0", ["expire"], "timestamp expired (node clock +1 year)")
    # The agent's timer, on, and its first check (at its start) with the clock still ahead.
    refused_at = (status(vm)["state"].get("last_error") or {}).get("time")
    configure_agent(vm, auto=True, interval=60, reboot=False)

    def timer_refused(report: dict) -> bool:
        error = report["state"].get("last_error") or {}
        return error.get("time") != refused_at and "expire" in error.get("message", "").lower()

    report = wait_for(vm, "the timer's check refused with the clock ahead", timer_refused, timeout=300)
    remembered = vm.run(f"cat {TUF_LATEST_KNOWN_TIME} 2>/dev/null || echo none").strip()
    ctx.note(f"clock +1 year: {summary(report)}; latest known time on disk: {remembered}")
    check(str(time.gmtime(year_ahead).tm_year) not in remembered,
          f"the clock a year ahead must not be remembered: {TUF_LATEST_KNOWN_TIME}: {remembered}")
    # The clock back (what time synchronisation does): nobody touches the node.
    started = time.monotonic()
    vm.run(f"date -u -s @{int(time.time())}")
    report = wait_for(vm, "2.0.0 installed by the timer once the clock is back",
                      lambda r: operation(r) == "installed", timeout=1200, interval=5)
    check(slot_view(report, "b")["version"] == "2.0.0", f"slot B should hold 2.0.0: {summary(report)}")
    ctx.phase("clock back -> 2.0.0 installed by the timer", time.monotonic() - started)
    ctx.note(f"clock back: {summary(report)}")


@test()
def e2e_attack_downgrade(ctx: Context) -> None:
    """A node on 2.0.0 offered 1.0.0 as the newest version does not install it."""
    repo, server, vm = attack_setup(ctx, "v1", disk="v2")
    code, result = cli_json(vm, "check", timeout=120)
    ctx.note(f"check: {result if isinstance(result, str) else result.get('message')}")
    check(isinstance(result, dict) and result.get("result") in ("up-to-date", "refused"),
          f"1.0.0 must not be offered to a node on 2.0.0: {result}")
    refused(ctx, vm, "2.0.0", ["up to date", "downgrade", "lower", "older", "newest allowed"], "downgrade")


@test()
def e2e_attack_other_variant_or_arch(ctx: Context) -> None:
    """Updates published for another variant, and for another arch under this
    variant's name, are not installed."""
    variant = ctx.builds.variant
    repo, server = ctx.repo("v1")
    # Another variant, through the publisher.
    fake = ctx.dir / "fake-rpi4" / variant
    fake.parent.mkdir(parents=True)
    shutil.copytree(ctx.builds.dirs["v2"], fake, copy_function=os.link)
    (fake / "manifest.json").unlink()
    manifest = ctx.builds.manifest("v2")
    manifest["version"] = "8.0.0"
    manifest["variant"] = "rpi4"
    (fake / "manifest.json").write_text(json.dumps(manifest, indent=2))
    repo.publish(fake)
    # Another arch under this variant's name: racklet-image refuses to publish
    # that, so the signed manifest is edited and re-signed behind its back.
    # The entry is 2.0.0's (published in a scratch repository for its target
    # names and files): were the arch filter broken, it would install.
    scratch = Repo(ctx.builds, ctx.dir / "scratch-repo")
    scratch.publish("v2")
    entry = next(u for u in json.loads(next(
        p for p in (scratch.path / "targets").iterdir() if p.name.endswith("manifest.json")).read_bytes())["updates"]
        if u["variant"] == variant)

    other = json.loads(json.dumps(entry))
    other["arch"] = "aarch64"
    other["version"] = other["max_version"] = "9.0.0"
    served = {}  # the 9.0.0 targets are 2.0.0's files under new names
    for target in other["targets"]:
        old_name = target["target"]
        target["target"] = old_name.replace(f"-{entry['version']}-", "-9.0.0-")
        served[target["target"]] = next(p for p in (scratch.path / "targets").iterdir()
                                        if p.name.endswith("." + old_name))
    repo.resign_update_manifest(lambda update_manifest: update_manifest["updates"].append(other), served)
    repo.image("repo", "validate", "--repo", str(repo.path))  # tough accepts the re-signed repository
    listing = repo.image("repo", "list", "--repo", str(repo.path))
    ctx.note("repository: " + " | ".join(line.strip() for line in listing.splitlines() if line.strip())[:400])
    check("rpi4" in listing and "aarch64" in listing, f"the repository should list rpi4 8.0.0 and "
          f"{variant}/aarch64 9.0.0: {listing}")
    vm = manual_node(ctx, server)
    code, result = cli_json(vm, "check", timeout=120)
    check(code == 0 and isinstance(result, dict) and result.get("result") == "up-to-date",
          f"rpi4 8.0.0 and aarch64 9.0.0 must not be offered to a {variant} x86_64 node: {result}")
    ctx.note(f"check: {result.get('message')}")
    refused(ctx, vm, "1.0.0", ["up to date", "nothing published", "variant", "arch"], "other variant/arch")
    fetched = [r.path for r in server.target_requests() if "manifest" not in r.path]
    check(not fetched, f"nothing may be downloaded for another variant or arch: {fetched}")


@test()
def e2e_attack_server_away(ctx: Context) -> None:
    """The server goes away mid-download: the apply fails cleanly; once it is
    back, the next apply resumes or restarts and installs."""
    repo, server, vm = attack_setup(ctx, "v1", "v2")
    size = (repo.path / repo.target_path("2.0.0", "root").lstrip("/")).stat().st_size
    server.cut_paths = repo.target_path("2.0.0", "root")
    server.cut_after = size // 3

    def go_away() -> None:
        # Once the cut happened, stay away for a while.
        while server.cut_after is not None:
            time.sleep(0.2)
        server.down = True
    import threading
    threading.Thread(target=go_away, daemon=True).start()
    refused(ctx, vm, "1.0.0", ["connection", "eof", "closed", "reset", "incomplete", "error", "body",
                                "decod", "request"], "server away mid-download")
    server.down = False
    started = time.monotonic()
    code, result = cli_json(vm, "apply", timeout=1500)
    check(code == 0, f"apply after the server came back failed ({code}): {result}")
    report = status(vm)
    check(operation(report) == "installed" and slot_view(report, "b")["version"] == "2.0.0",
          f"2.0.0 should be installed in B: {summary(report)}")
    resumed = [r for r in server.target_requests() if "root" in r.path]
    ctx.note(f"after the server returned: installed in {time.monotonic() - started:.0f} s; root requests: {resumed}")


@test()
def e2e_attack_corrupted_inactive_root(ctx: Context) -> None:
    """A byte of the inactive root flipped after the agent wrote and verified
    it: dm-verity stops the try, the node comes back to A, 2.0.0 is never committed."""
    repo, server, vm = attack_setup(ctx, "v1", "v2")
    code, result = cli_json(vm, "apply", timeout=1500)
    check(code == 0, f"apply failed ({code}): {result}")
    report = status(vm)
    check(operation(report) == "installed", f"not installed: {summary(report)}")
    vm.poweroff()
    overlay = ctx.last_overlay
    root_b = overlay.partition("root-b")
    # The first data block of systemd, as in test_boot.py's corruption test.
    from test_boot import systemd_block  # noqa: E402
    manifest = ctx.builds.manifest("v2")
    used = next(a for a in manifest["artifacts"] if a["kind"] == "root-filesystem")["uncompressed_size"]
    erofs = ctx.dir / "root-b.erofs"
    overlay.extract_partition("root-b", erofs)
    with open(erofs, "r+b") as handle:
        handle.truncate(used)
    offset, what = systemd_block(None, erofs)
    erofs.unlink()
    offset += manifest["verity"]["data_block_size"] // 2
    original = overlay.read(root_b.start + offset, 1)[0]
    overlay.write(root_b.start + offset, bytes([original ^ 0xFF]))
    vm.cursor = len(vm.output)
    vm.start()
    first = vm.expect(BOOT_LINE, timeout=300)
    check(".slot=b" in first.group(1), f"the try should boot B: {first.group(1)}")
    corrupted = vm.expect(VERITY_CORRUPTION, timeout=300, fail=AUTOLOGIN)
    boot_to_shell(vm, "a")
    check(not AUTOLOGIN.search(vm.output[first.start():corrupted.start()]),
          "slot B reached a login despite the corrupted root")
    report = wait_for(vm, "back on A, the corrupt try not committed",
                      lambda r: operation(r) == "idle" and r["state"].get("last_error"), timeout=120)
    on_good_slot(report, "1.0.0")
    view = slot_view(report, "b")
    check(view["state"] != "good" and view["boot_state"] in ("bad", "absent"),
          f"the corrupted slot B must not be committed or bootable: {summary(report)}")
    failed = {f["version"] for f in report["state"]["failed_versions"]}
    interrupted = set(report["state"].get("interrupted_tries", []))
    check("2.0.0" in failed | interrupted,
          f"2.0.0's failed try should be recorded (failed_versions or interrupted_tries): {summary(report)}")
    # If the agent installs 2.0.0 once more, it must write it afresh (the
    # corrupt bytes replaced): whatever is committed later verifies.
    ctx.note(f"flipped {what} in root-b; kernel: {corrupted.group(0).strip()}; {summary(report)}")


def vm_partitions(ctx: Context):
    from harness import partitions
    return partitions(ctx.disk("v1"))


@test()
def e2e_fault_write_error(ctx: Context) -> None:
    """Writes to the inactive root fail (EIO injected by QEMU's blkdebug):
    the install stops with the error, the node stays on A, B unbootable."""
    parts = vm_partitions(ctx)
    root_b = parts["root-b"]
    config = ctx.dir / "blkdebug.conf"
    sector = (root_b.start + 32 * 1024 * 1024) // 512
    config.write_text(f'[inject-error]\nevent = "pwritev"\niotype = "write"\nerrno = "5"\nsector = "{sector}"\nonce = "off"\n')

    def block(overlay: Overlay) -> list[str]:
        return [f"if=none,id=disk0,werror=report,rerror=report,driver=blkdebug,config={config},"
                f"image.driver=qcow2,image.file.driver=file,image.file.filename={overlay.path}"]
    repo, server, vm = attack_setup(ctx, "v1", "v2", block=block)
    refused(ctx, vm, "1.0.0", ["space", "i/o", "error", "write"], "EIO on root-b")


# ---------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", default=[],
                        help="run only these tests (comma-separated names or prefixes; repeatable)")
    parser.add_argument("--list", action="store_true", help="list the tests and exit")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="qemu-x86_64",
                        help="qemu-x86_64 (systemd-boot, default) or qemu-aarch64 (U-Boot, the rpi4 boot path)")
    parser.add_argument("--builds", type=Path, default=REPO / "build/e2e",
                        help="v1/ v2/ v3/ and keys/ (default build/e2e); missing versions are built")
    parser.add_argument("--no-build", action="store_true", help="fail instead of building a missing version")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: new under /tmp)")
    parser.add_argument("--memory", type=int, default=1024, help="guest RAM in MiB (default 1024)")
    parser.add_argument("--count", type=int, default=None,
                        help="power cuts: run N cuts at random moments (default: one of each kind)")
    parser.add_argument("--moment", action="append", choices=MOMENTS,
                        help="power cuts: only these moments (repeatable)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for the power-cut moments")
    parser.add_argument("--keep", action="store_true", help="keep the overlays")
    parser.add_argument("--cold-boot", action="store_true",
                        help="boot every fresh node from power-on (default: resume the state saved "
                             "after one such boot per version)")
    parser.add_argument("--saved-boots", type=Path, default=None,
                        help="share the saved boots with other runs using this directory at the same "
                             "time (make test: the e2e jobs of one variant; left in place)")
    options = parser.parse_args()
    if options.seed is None:
        options.seed = random.randrange(1 << 30)

    arch = VARIANTS[options.variant]
    if options.list:
        for name, arches, function in TESTS:
            print(f"{name:36} {','.join(arches):15} {function.__doc__.splitlines()[0]}")
        return 0
    wanted = [word for item in options.only for word in item.split(",") if word]
    aliases = {"powercut": "e2e_power_cuts", "scenario": "e2e_update_scenario", "waves": "e2e_waves",
               "attack": "e2e_attack", "fault": "e2e_fault", "https": "e2e_https", "offline": "e2e_offline", "delta": "e2e_delta"}
    wanted = [aliases.get(w, w) for w in wanted]
    selected = [(name, function) for name, arches, function in TESTS
                if arch in arches and (not wanted or any(name == w or name.startswith(w) for w in wanted))]
    if not selected:
        print(f"no {arch} test matches {wanted}; --list shows them", file=sys.stderr)
        return 2
    scratch = options.workdir or Path(tempfile.mkdtemp(prefix="racklet-e2e-"))
    scratch.mkdir(parents=True, exist_ok=True)
    print(f"{options.variant}: scratch directory: {scratch}; power-cut seed {options.seed}", flush=True)
    setup_error = None
    builds = None
    missing = require_tools(arch)
    if missing:
        setup_error = "missing host tools: " + ", ".join(missing)
    else:
        try:
            builds = Builds(options.builds.resolve(), options.variant, not options.no_build)
        except Exception as error:  # noqa: BLE001
            setup_error = str(error)

    passed = failed = 0
    for name, function in selected:
        started = time.monotonic()
        ctx = None
        try:
            if setup_error:
                raise HarnessError(setup_error)
            ctx = Context(name, scratch, builds, options)
            function(ctx)
        except Exception as error:  # noqa: BLE001
            failed += 1
            kind = "" if isinstance(error, (TestFailure, HarnessError)) else f"{type(error).__name__}: "
            print(f"FAIL {name} ({time.monotonic() - started:.0f} s): {kind}{error}", flush=True)
            if not isinstance(error, (TestFailure, HarnessError)):
                traceback.print_exc()
            if ctx:
                for note in ctx.notes:
                    print(f"     note: {note}")
                for vm in ctx.vms[-1:]:
                    if "last 60 lines" not in str(error):
                        print(vm.tail(60))
                for vm in ctx.vms:
                    print(f"     serial log: {vm.log_path}")
        else:
            passed += 1
            print(f"ok   {name} ({time.monotonic() - started:.0f} s)", flush=True)
            for note in ctx.notes:
                print(f"     {note}")
        finally:
            if ctx:
                for phase, seconds in ctx.phases:
                    print(f"     time: {phase}: {seconds:.1f} s")
                ctx.close()
                if not options.keep:
                    for overlay in ctx.dir.glob("*.qcow2"):
                        overlay.unlink()
                    shutil.rmtree(ctx.dir / "repo", ignore_errors=True)
                    shutil.rmtree(ctx.dir / "scratch-repo", ignore_errors=True)
    if not options.keep:
        shutil.rmtree(scratch / "images", ignore_errors=True)
        shutil.rmtree(scratch / "saved-boot", ignore_errors=True)
    print(f"serial logs: {scratch}")
    cuts = getattr(options, "cut_results", None)
    if options.count is not None and cuts is not None and len(selected) == 1:
        # The soak: count the cuts, not the one test that ran them.
        passed, failed = sum(cuts), len(cuts) - sum(cuts)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
