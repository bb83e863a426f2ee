#!/usr/bin/env python3
"""Boot tests for Racklet OS images under QEMU (TCG).

    python3 tests/vm/test_boot.py [--only NAME[,NAME]] [--build DIR] [--list]

Needs build/qemu-x86_64 and build/qemu-aarch64 (`make variant=... build`).
The images are copied (sparse) into a scratch directory first, so a rebuild
while the tests run cannot pull the disk out from under an overlay; every test
boots its own qcow2 overlay of that copy and never touches build/.
See tests/vm/README.md for what each test proves.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    AUTOLOGIN,
    HarnessError,
    Overlay,
    TestFailure,
    VM,
    check,
    clean,
    copy_sparse,
    decode_uboot_env,
    encode_uboot_env,
    free_port,
    read_osrel_version,
    require_tools,
    uki_cmdline,
    with_cmdline_replaced,
    with_osrel_version,
)
from agent_privileges import check_agent_privileges  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
X86 = "qemu-x86_64"
ARM = "qemu-aarch64"
ARCH = {X86: "x86_64", ARM: "aarch64"}

# A boot that went wrong, seen on the console: stop waiting at once.
BOOT_FAILURE = re.compile(
    r"(racklet-init: FATAL|Kernel panic|login: PAM Failure|racklet: nothing bootable)[^\r\n]*\r?\n"
    r"|device-mapper: verity: [^\r\n]*corrupted")
# Whole lines only: the serial output arrives in pieces.
KERNEL_CMDLINE = re.compile(r"Kernel command line: ([^\r\n]*)\r?\n")
INIT_OK = re.compile(r"racklet-init: slot ([ab]): [^\r\n]*starting [^\r\n]*\r?\n")
SYSTEMD_BOOT_VENDOR_GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
# The CA bundle TLS clients read, and the image's own (os_format::settings).
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
IMAGE_CA_BUNDLE = "/usr/share/racklet/ca-certificates.crt"
# The SSH host key, made at the first boot on the data partition (packages/ssh).
HOST_KEY = "/var/lib/racklet/ssh/ssh_host_ed25519_key.pub"


# ---------------------------------------------------------------------------
# Images and per-test context


class Image:
    """One variant's build output, snapshotted into the scratch directory."""

    def __init__(self, variant: str, build: Path, scratch: Path):
        source = build / variant
        self.variant = variant
        self.arch = ARCH[variant]
        self.dir = scratch / "images" / variant
        (self.dir / "update").mkdir(parents=True, exist_ok=True)
        for name in ["disk.img", "manifest.json", "update/uki-a.efi", "update/uki-b.efi"]:
            if not (source / name).exists():
                raise HarnessError(f"{source / name} is missing: run `make variant={variant} build` first")
        # Sparse copy: the disk is ~5 GB with ~200-300 MB of data.
        copy_sparse(source / "disk.img", self.dir / "disk.img")
        for name in ["manifest.json", "update/uki-a.efi", "update/uki-b.efi"]:
            shutil.copyfile(source / name, self.dir / name)
        self.disk = self.dir / "disk.img"
        self.manifest = json.loads((self.dir / "manifest.json").read_text())
        self.root_hash = self.manifest["verity"]["root_hash"]
        self.version = self.manifest["version"]
        self.uki_b = self.dir / "update" / "uki-b.efi"

    def broken_uki_b(self) -> bytes:
        """Slot B's UKI with a root hash no partition on the disk has: racklet-init
        waits for its partitions, prints FATAL and reboots. (The unmodified
        uki-b.efi carries the same root hash as slot A, and racklet-init finds
        partitions by root hash alone, so it would boot slot A's partitions.)"""
        uki = self.uki_b.read_bytes()
        check(f"racklet.roothash={self.root_hash}" in uki_cmdline(uki), f"uki-b.efi: {uki_cmdline(uki)}")
        missing = hashlib.sha256(b"racklet vm test: a root nobody has").hexdigest()
        return with_cmdline_replaced(uki, self.root_hash, missing)

    def artifact(self, kind: str) -> dict:
        return next(a for a in self.manifest["artifacts"] if a["kind"] == kind)


class Context:
    def __init__(self, name: str, scratch: Path, images: dict, options):
        self.name = name
        self.dir = scratch / name
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        self._images = images
        self.options = options
        self.vms: list[VM] = []
        self.notes: list[str] = []

    def image(self, variant: str) -> Image:
        return self._images[variant]

    def overlay(self, image: Image, label: str = "disk") -> Overlay:
        overlay = Overlay(image.disk, self.dir / f"{label}.qcow2")
        if image.arch == "aarch64" and self.options.boot_cmd:
            script = self.dir / "boot.scr"
            subprocess.run(["mkimage", "-A", "arm64", "-O", "linux", "-T", "script", "-C", "none",
                            "-n", "racklet-ab", "-d", str(self.options.boot_cmd), str(script)],
                           check=True, capture_output=True)
            with overlay.esp() as esp:
                esp.write("boot.scr", script.read_bytes())
            self.note(f"boot.scr replaced by {self.options.boot_cmd}")
        return overlay

    def vm(self, image: Image, overlay: Overlay, label: str = "vm", **kwargs) -> VM:
        kwargs.setdefault("memory", self.options.memory)
        vm = VM(image.arch, overlay, self.dir, label, **kwargs)
        self.vms.append(vm)
        return vm

    def note(self, text: str) -> None:
        self.notes.append(text)

    def close(self) -> None:
        for vm in self.vms:
            vm.close()


TESTS: list[tuple[str, list[str], object]] = []


def test(*variants: str):
    def register(function):
        TESTS.append((function.__name__, list(variants), function))
        return function
    return register


# ---------------------------------------------------------------------------
# Shared steps


def boot_to_shell(vm: VM, slot: str = "a", timeout: float = 400) -> dict:
    """Start (if needed) and wait for racklet-init and the autologin shell.
    Returns timings (seconds since QEMU start)."""
    if not vm.running():
        vm.start()
    cmdline = vm.expect(KERNEL_CMDLINE, timeout=timeout, fail=BOOT_FAILURE)
    kernel_at = vm.time_at(cmdline.start())
    check(f"racklet.slot={slot}" in cmdline.group(1),
          f"expected slot {slot} on the kernel command line, got: {cmdline.group(1)}")
    init = vm.expect(INIT_OK, timeout=timeout, fail=BOOT_FAILURE)
    check(init.group(1) == slot, f"racklet-init started slot {init.group(1)}, expected {slot}")
    init_at = vm.time_at(init.start())
    # Autologin: fail fast on a FATAL/panic/PAM failure instead of timing out.
    login = vm.expect(AUTOLOGIN, timeout=timeout, fail=BOOT_FAILURE)
    login_at = vm.time_at(login.start())
    vm.cursor = login.start()
    vm.wait_for_login(timeout=60)
    return {"kernel": kernel_at, "init": init_at, "login": login_at, "cmdline": cmdline.group(1)}


def root_checks(vm: VM, image: Image, slot: str) -> None:
    """The running system sits on the dm-verity root of `slot`."""
    source, fstype, options = vm.run("findmnt -n -o SOURCE,FSTYPE,OPTIONS /").split()
    check(source in ("/dev/mapper/racklet-root", "/dev/dm-0"), f"/ is mounted from {source}")
    check(fstype == "erofs", f"/ is {fstype}, expected erofs")
    check("ro" in options.split(","), f"/ is not read-only: {options}")
    name = vm.run("cat /sys/block/dm-0/dm/name").strip()
    check(name == "racklet-root", f"dm-0 is named {name!r}")
    status, table = vm.run("dmsetup table racklet-root", check=False)
    check(status == 0, f"dmsetup table failed: {table}")
    fields = table.split()
    check(len(fields) > 10 and fields[2] == "verity",
          f"racklet-root is not a verity target: {table.strip()}")
    check(image.root_hash in fields, f"verity table does not carry the manifest's root hash: {table.strip()}")
    check("restart_on_corruption" in fields, f"no restart_on_corruption in: {table.strip()}")
    cmdline = vm.run("cat /proc/cmdline")
    check(f"racklet.roothash={image.root_hash}" in cmdline, f"/proc/cmdline: {cmdline.strip()}")
    check(f"racklet.slot={slot}" in cmdline, f"/proc/cmdline: {cmdline.strip()}")
    status, output = vm.run("touch /usr/.racklet-write-test", check=False)
    check(status != 0 and "Read-only file system" in output, f"writing to /usr: {status} {output.strip()}")


def patch_esp(overlay: Overlay, files: dict[str, bytes] | None = None, delete: list[str] = ()) -> None:
    with overlay.esp() as esp:
        for path in delete:
            esp.delete(path)
        for path, data in (files or {}).items():
            esp.write(path, data)


def esp_listing(overlay: Overlay, directory: str) -> list[str]:
    with overlay.esp() as esp:
        return esp.listdir(directory)


def esp_fsck(overlay: Overlay) -> None:
    """fsck.fat -n on the overlay's ESP (U-Boot's fatwrite must leave it clean)."""
    if shutil.which("fsck.fat") is None:
        return
    raw = overlay.extract_partition("esp", overlay.path.with_suffix(".fsck.raw"))
    try:
        result = subprocess.run(["fsck.fat", "-n", str(raw)], capture_output=True, text=True)
    finally:
        raw.unlink(missing_ok=True)
    check(result.returncode == 0, f"fsck.fat -n on the ESP: {result.stdout.strip()} {result.stderr.strip()}")


def read_states(overlay: Overlay) -> list[dict | None]:
    with overlay.esp() as esp:
        return [decode_uboot_env(esp.read(f"racklet/state-{n}.env")) for n in (1, 2)]


def state(seq, order, tries_b="-", tries_a="-", committed="a") -> dict:
    return {"racklet_seq": str(seq), "racklet_order": order, "racklet_committed": committed,
            "racklet_tries_a": str(tries_a), "racklet_tries_b": str(tries_b)}


def damaged(blob: bytes) -> bytes:
    """A state copy with a wrong CRC (one data byte flipped, as a torn write would)."""
    data = bytearray(blob)
    data[12] ^= 0x20
    return bytes(data)


def uboot_decision(vm: VM, timeout: float = 240) -> str:
    """Wait for the boot script's state line; returns it."""
    vm.expect(r"Found U-Boot script /boot.scr", timeout=timeout)
    line = vm.expect(r"racklet: (state copy [^\r\n]*|no valid boot state[^\r\n]*)\r?\n", timeout=60)
    return line.group(0).strip()


# ---------------------------------------------------------------------------
# x86_64: OVMF -> systemd-boot -> UKI


def verified_root_checks(ctx: Context, vm: VM, image: Image, times: dict) -> None:
    """A first boot of the image as built: on the dm-verity root of slot A,
    start-up finished, the required units active, os-release as the manifest."""
    root_checks(vm, image, "a")
    # Units are checked once start-up has finished: at the login prompt a
    # slow (loaded, one-vCPU) guest may still be activating them.
    status, state_text = vm.run("systemctl is-system-running --wait", timeout=300, check=False)
    state_text = state_text.strip()
    if state_text == "degraded":
        failed = vm.run("systemctl --failed --no-legend --plain", check=False)[1].strip()
        ctx.note(f"system is degraded; failed units: {failed}")
    check(state_text in ("running", "degraded"), f"is-system-running: {state_text!r}")
    for unit in sorted(set(image.manifest.get("required_units", [])) | {"containerd.service"}):
        active = vm.run(f"systemctl is-active {unit}", check=False)[1].strip()
        check(active == "active", f"{unit} is {active!r}")
    osrel = dict(re.findall(r"^([A-Z_]+)=\"?([^\"\n]*)\"?$", vm.run("cat /etc/os-release"), re.M))
    check(osrel.get("IMAGE_VERSION") == image.version,
          f"IMAGE_VERSION {osrel.get('IMAGE_VERSION')!r} != manifest version {image.version!r}")
    check(osrel.get("VARIANT_ID") == X86, f"VARIANT_ID {osrel.get('VARIANT_ID')!r}")
    running_at = vm.elapsed()
    analyze = vm.run("systemd-analyze", check=False)[1].strip().splitlines()
    ctx.note(f"system state {state_text!r}; kernel cmdline at {times['kernel']:.1f} s, racklet-init done at "
             f"{times['init']:.1f} s, autologin at {times['login']:.1f} s, is-system-running returned at "
             f"{running_at:.1f} s (QEMU start = 0); systemd-analyze: {analyze[0] if analyze else '?'}")


@test(X86)
def x86_boot_verified_root_then_reboots(ctx: Context) -> None:
    """Three boots of one node (each boot under TCG costs about 45
    CPU-seconds, so these share one). The image as built, written to a card
    1 GiB larger than the image, boots to multi-user under UEFI on the
    dm-verity root of slot A; the data partition grows into the free space
    and /var's file system with it at the next boot; /var, the /etc overlay
    and the machine ID survive a reboot; that reboot goes through a
    boot-counted entry, which systemd-bless-boot blesses; then a hung PID 1
    stops feeding the watchdog (softdog) and the machine is reset and boots
    again."""
    image = ctx.image(X86)
    overlay = ctx.overlay(image)
    data = overlay.partition("data")
    # A card bigger than the image (qemu-img resize of the overlay).
    subprocess.run(["qemu-img", "resize", "-q", str(overlay.path), "+1G"], check=True)
    vm = ctx.vm(image, overlay)
    times = boot_to_shell(vm, "a")
    verified_root_checks(ctx, vm, image, times)

    # Growth: systemd-repart grows the data partition on the first boot.
    grown = int(vm.run(f"lsblk -b -n -d -o SIZE /dev/vda{data.number}").strip())
    check(grown >= data.size + 900 * 1024 * 1024,
          f"data partition is {grown} bytes after the first boot; it was {data.size} on a disk 1 GiB larger")

    # Persistence: tokens in /var and /etc, the machine ID.
    var = vm.run("findmnt -n -o SOURCE,FSTYPE,OPTIONS /var").split()
    check(var[0] == f"/dev/vda{data.number}" and var[1] == "ext4" and "rw" in var[2].split(","),
          f"/var is {var}, expected /dev/vda{data.number} ext4 rw")
    etc = vm.run("findmnt -n -o FSTYPE,OPTIONS /etc").split()
    check(etc[0] == "overlay" and "var/lib/racklet/etc/upper" in etc[1], f"/etc is {etc}")
    token = secrets.token_hex(16)
    vm.run(f"mkdir -p /var/lib/racklet-test && echo {token} > /var/lib/racklet-test/token"
           f" && echo {token} > /etc/racklet-test-token && sync")
    machine_id = vm.run("cat /etc/machine-id").strip()
    check(re.fullmatch(r"[0-9a-f]{32}", machine_id), f"machine-id {machine_id!r}")
    boot_id = vm.run("cat /proc/sys/kernel/random/boot_id").strip()

    # Counting: once the agent's health gate passed, the committed UKI is
    # counted (racklet-a+3.efi, three boots before systemd-boot falls back).
    confirmed = wait_for_listing(vm, ["racklet-a+3.efi"])
    vm.reboot()
    boot_to_shell(vm, "a")
    check(vm.run("cat /proc/sys/kernel/random/boot_id").strip() != boot_id, "the boot ID did not change")
    check(vm.run("cat /var/lib/racklet-test/token", check=False)[1].strip() == token, "/var token lost")
    check(vm.run("cat /etc/racklet-test-token", check=False)[1].strip() == token, "/etc token lost")
    after = vm.run("cat /etc/machine-id").strip()
    check(after == machine_id, f"machine-id changed across the reboot: {machine_id} -> {after}")
    ctx.note(f"machine-id {machine_id} kept; token {token} kept in /var and /etc")
    # Growth: x-systemd.growfs grows /var's ext4 to the partition at this boot.
    var_size = int(vm.run("df -B1 --output=size /var | tail -n 1").strip())
    check(var_size >= 900 * 1024 * 1024, f"/var is {var_size} bytes; expected it grown with its partition")
    ctx.note(f"data partition {data.size} -> {grown} bytes; /var {var_size} bytes")
    count_path = vm.run(f"cat /sys/firmware/efi/efivars/LoaderBootCountPath-{SYSTEMD_BOOT_VENDOR_GUID}"
                        " | tail -c +5 | tr -d '\\000'", check=False)[1].strip()
    check(count_path.endswith("racklet-a+2-1.efi"), f"LoaderBootCountPath is {count_path!r}")
    bless = vm.run("systemctl is-enabled systemd-bless-boot.service", check=False)[1].strip()
    check(bless == "masked", f"systemd-bless-boot.service is {bless!r}, expected masked")
    listing = wait_for_listing(vm, ["racklet-a+3.efi"])
    ctx.note(f"first boot confirmed: {confirmed}; booted via {count_path}; systemd-bless-boot {bless}; "
             f"confirmed again: {listing}")

    # Watchdog: armed by systemd; a frozen PID 1 stops petting it.
    runtime = vm.run("systemctl show -p RuntimeWatchdogUSec --value").strip()
    check(runtime == "30s", f"RuntimeWatchdogUSec is {runtime!r}, expected 30s")
    status, output = vm.run("grep -q '^softdog ' /proc/modules && test -c /dev/watchdog0", check=False)
    check(status == 0, f"softdog is not loaded or /dev/watchdog0 is missing: {output.strip()}")
    boot_id = vm.run("cat /proc/sys/kernel/random/boot_id").strip()
    # Freeze PID 1 (the kernel ignores SIGSTOP for init, the cgroup freezer does
    # not): it no longer pets the watchdog, and nothing else reboots the machine.
    vm.send("echo 1 > /sys/fs/cgroup/init.scope/cgroup.freeze\n")
    started = time.monotonic()
    boot_to_shell(vm, "a", timeout=240)
    after = vm.run("cat /proc/sys/kernel/random/boot_id").strip()
    check(after != boot_id, "the machine did not restart")
    check(vm.run("cat /var/lib/racklet-test/token", check=False)[1].strip() == token,
          "/var token lost in the watchdog reset")
    ctx.note(f"watchdog reset and boot to the shell {time.monotonic() - started:.0f} s after PID 1 froze")
    check(vm.poweroff() == 0, "QEMU did not exit cleanly after poweroff")


def wait_for_listing(vm: VM, expected: list[str], timeout: float = 240) -> list[str]:
    """Wait until /efi/EFI/Linux lists exactly `expected` (the agent renames
    the booted UKI once its health gate passed); returns the listing."""
    deadline = time.monotonic() + timeout
    while True:
        listing = vm.run("ls /efi/EFI/Linux").split()
        if listing == expected:
            return listing
        if time.monotonic() > deadline:
            raise TestFailure(f"/efi/EFI/Linux is {listing}, expected {expected} within {timeout:.0f} s; "
                              f"agent: {vm.run('journalctl -b -u racklet-update --no-pager | tail -n 5', check=False)[1]}")
        time.sleep(3)


def systemd_block(image: Image, erofs: Path) -> tuple[int, str]:
    """(byte offset inside the root file system, what) of a block read at boot:
    the first data block of /usr/lib/systemd/systemd (exec'd as PID 1)."""
    if shutil.which("dump.erofs") is None:
        raise HarnessError("dump.erofs (erofs-utils) is needed to find a file's blocks")
    for path in ["/usr/lib/systemd/systemd", "/lib/systemd/systemd"]:
        result = subprocess.run(["dump.erofs", f"--path={path}", "-e", str(erofs)],
                                capture_output=True, text=True)
        extents = re.findall(r"^\s*\d+:\s*\d+\.\.\s*\d+\s*\|\s*\d+\s*:\s*(\d+)\.\.\s*(\d+)",
                             result.stdout, re.M)
        if result.returncode == 0 and extents:
            return int(extents[0][0]), f"first extent of {path}"
    raise HarnessError(f"dump.erofs found no extents for systemd: {result.stdout}{result.stderr}")


@test(X86)
def x86_verity_detects_corruption(ctx: Context) -> None:
    """One flipped byte in root-a: dm-verity reports it and the machine resets; no shell."""
    image = ctx.image(X86)
    overlay = ctx.overlay(image)
    root = overlay.partition("root-a")
    used = image.artifact("root-filesystem")["uncompressed_size"]
    erofs = ctx.dir / "root-a.erofs"
    with open(image.disk, "rb") as disk, open(erofs, "wb") as out:
        disk.seek(root.start)
        left = used
        while left:
            chunk = disk.read(min(left, 4 << 20))
            out.write(chunk)
            left -= len(chunk)
    offset, what = systemd_block(image, erofs)
    erofs.unlink()
    block_size = image.manifest["verity"]["data_block_size"]
    check(offset < used, f"offset {offset} beyond the used {used} bytes")
    offset += block_size // 2  # the middle of that block
    with open(image.disk, "rb") as disk:
        disk.seek(root.start + offset)
        original = disk.read(1)[0]
    overlay.write(root.start + offset, bytes([original ^ 0xFF]))
    check(overlay.read(root.start + offset, 1)[0] == original ^ 0xFF, "the flipped byte did not land")
    expected_block = offset // block_size
    vm = ctx.vm(image, overlay, no_reboot=True)
    vm.start()
    corrupted = vm.expect(r"device-mapper: verity: [^\r\n]*data block (\d+) is corrupted", timeout=400,
                          fail=AUTOLOGIN)
    check(int(corrupted.group(1)) == expected_block,
          f"verity reported block {corrupted.group(1)}, the flipped byte is in block {expected_block}")
    code = vm.wait_exit(120)
    output = clean(vm.output)
    check("reboot: Restarting system" in output or "dm-verity device corrupted" in output,
          "no kernel restart after the corruption")
    check(not AUTOLOGIN.search(output) and "racklet-init: slot a" in output,
          "the corrupt root must fail after racklet-init opened it, before any login")
    ctx.note(f"flipped root-a byte {offset} ({what}, block {expected_block}); kernel: "
             f"{corrupted.group(0).strip()}; QEMU exited {code} (-no-reboot) after {vm.elapsed():.1f} s")


def counting_overlay(ctx: Context, image: Image) -> tuple[Overlay, str]:
    """An overlay whose ESP also has slot B's UKI as a fresh boot-counted entry
    (1 try) with a higher IMAGE_VERSION in .osrel, so systemd-boot prefers it."""
    overlay = ctx.overlay(image)
    newer = re.sub(r"\d", "9", image.version)
    check(newer != image.version, f"cannot make a higher version than {image.version}")
    uki = with_osrel_version(image.broken_uki_b(), image.version, newer)
    check(read_osrel_version(uki) == newer, "patched .osrel not readable")
    patch_esp(overlay, {"EFI/Linux/racklet-b+1.efi": uki})
    return overlay, newer


@test(X86)
def x86_failed_try_falls_back_then_wiped_data_is_recreated(ctx: Context) -> None:
    """Two recoveries on one node (a boot under TCG costs about 45 CPU-seconds).
    systemd-boot tries a counted entry once (renaming it +0-1), then boots A;
    on that boot a wiped data partition: racklet-init says so and boots on;
    systemd formats /var (x-systemd.makefs); the next boot has /var and the
    /etc overlay."""
    image = ctx.image(X86)
    overlay, newer = counting_overlay(ctx, image)
    data = overlay.partition("data")
    overlay.write(data.start, bytes(4 * 1024 * 1024))  # superblocks and group descriptors gone
    vm = ctx.vm(image, overlay)  # no -no-reboot: racklet-init reboots after FATAL
    vm.start()
    first = vm.expect(KERNEL_CMDLINE, timeout=400)
    check("racklet.slot=b" in first.group(1), f"first boot was not slot B: {first.group(1)}")
    fatal = vm.expect(r"racklet-init: FATAL: slot b[^\r\n]*\r?\n", timeout=300, fail=AUTOLOGIN)
    mark = vm.cursor
    times = boot_to_shell(vm, "a")
    root_checks(vm, image, "a")
    listing = vm.run("ls /efi/EFI/Linux").split()
    check("racklet-b+0-1.efi" in listing and "racklet-b+1.efi" not in listing
          and ("racklet-a.efi" in listing or "racklet-a+3.efi" in listing), f"/efi/EFI/Linux: {listing}")
    selected = vm.run(f"cat /sys/firmware/efi/efivars/LoaderEntrySelected-{SYSTEMD_BOOT_VENDOR_GUID}"
                      " | tail -c +5 | tr -d '\\000'").strip()
    check(selected == "racklet-a.efi", f"LoaderEntrySelected is {selected!r}")
    ctx.note(f"B (.osrel {newer}) tried once: {fatal.group(0).strip()[:100]}...; then A logged in "
             f"{times['login']:.1f} s after QEMU start")

    # The wiped data partition, on A's boot.
    check(re.search(r"racklet-init: data partition vda\d+ has no ext4 file system", vm.output[mark:]),
          "racklet-init did not say that the data partition has no file system")
    var = vm.run("findmnt -n -o SOURCE,FSTYPE /var").split()
    check(var == [f"/dev/vda{data.number}", "ext4"], f"/var after makefs is {var}")
    status, output = vm.run("touch /etc/racklet-write-test", check=False)
    check(status != 0, f"/etc was writable on the boot that formatted /var: {output.strip()}")
    vm.run("echo kept > /var/racklet-after-makefs && sync")
    vm.reboot()
    boot_to_shell(vm, "a")
    check(vm.run("cat /var/racklet-after-makefs").strip() == "kept", "/var lost its file")
    etc = vm.run("findmnt -n -o FSTYPE /etc").strip()
    check(etc == "overlay", f"/etc is {etc!r} on the boot after makefs, expected the overlay")
    check(vm.poweroff() == 0, "QEMU did not exit cleanly after poweroff")
    # A: counted once the agent confirmed a boot (+3), or counted down by the
    # last boot before the poweroff (+2-1).
    final = esp_listing(overlay, "EFI/Linux")
    check(final[1:] == ["racklet-b+0-1.efi"] and final[0] in ("racklet-a+3.efi", "racklet-a+2-1.efi", "racklet-a.efi"),
          f"ESP after the test: {final}")


# ---------------------------------------------------------------------------
# Node settings from the card (racklet/settings.toml, docs/settings.md)

RACKLET_IMAGE = Path(os.environ.get("RACKLET_IMAGE", REPO / "target/release/racklet-image"))


def provisioned_overlay(ctx: Context, image: Image, settings: str, label: str = "disk") -> Overlay:
    """An overlay of a raw copy of the image provisioned with `settings` by
    `racklet-image provision` (as a card would be)."""
    raw = ctx.dir / f"{label}.raw"
    copy_sparse(image.disk, raw)
    path = ctx.dir / f"{label}.settings.toml"
    path.write_text(settings)
    result = subprocess.run([str(RACKLET_IMAGE), "--json", "provision", "--disk", str(raw), "--settings", str(path)],
                            capture_output=True, text=True)
    check(result.returncode == 0, f"racklet-image provision failed ({result.returncode}): {result.stderr}")
    report = json.loads(result.stdout)
    ctx.note(f"provisioned {report['file']} ({report['bytes']} bytes) at ESP offset {report['esp_offset']}")
    return Overlay(raw, ctx.dir / f"{label}.qcow2")


def node_status(vm: VM) -> dict:
    text = vm.run("racklet-node --json status")
    return json.loads(text[text.index("{"):])


@test(X86)
def x86_settings_from_the_card(ctx: Context) -> None:
    """A card provisioned with racklet-image provision boots with its host name,
    k3s role and configuration, NTP servers, wave seed and an extra trusted CA; a setting changed on
    the ESP is applied at the next boot (files of a removed setting go); an
    invalid file keeps the previous settings and reports the file and key."""
    image = ctx.image(X86)
    # A throwaway CA, as a private update server or registry would have.
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ed25519", "-nodes", "-subj", "/CN=racklet-test-ca",
                    "-days", "1", "-keyout", str(ctx.dir / "ca.key"), "-out", str(ctx.dir / "ca.pem")],
                   check=True, capture_output=True)
    ca_pem = (ctx.dir / "ca.pem").read_text().strip()
    settings = (
        'hostname = "pi-7"\n'
        '[kubernetes]\nrole = "agent"\nserver = "https://pi-1.local:6443"\ntoken = "K10test-token"\n'
        'node_labels = ["racklet.io/shelf=2"]\n'
        '[time]\nntp_servers = ["ntp.racklet.invalid"]\n'
        '[update]\nwave_seed = 77\n'
        f'[trust]\nca_certificates = [{json.dumps(ca_pem)}]\n')
    overlay = provisioned_overlay(ctx, image, settings)
    vm = ctx.vm(image, overlay)
    boot_to_shell(vm, "a")
    check(vm.run("hostname").strip() == "pi-7", f"hostname {vm.run('hostname').strip()!r}")
    check(vm.run("cat /etc/hostname").strip() == "pi-7", "/etc/hostname is not pi-7")
    status = node_status(vm)
    check(status["settings_source"] == "card" and status["settings_error"] is None,
          f"racklet-node status: {status}")
    check(vm.run("cat /run/racklet/k3s.env").strip() == "K3S_ROLE=agent", "k3s.env")
    config = vm.run("cat /etc/rancher/k3s/config.yaml")
    for line in ['node-name: "pi-7"', 'server: "https://pi-1.local:6443"',
                 'token-file: "/etc/rancher/k3s/token"', '- "racklet.io/shelf=2"']:
        check(line in config, f"{line!r} not in config.yaml:\n{config}")
    check("K10test-token" not in config, "the token is in config.yaml")
    token = vm.run("stat -c '%a %U' /etc/rancher/k3s/token; cat /etc/rancher/k3s/token").split()
    check(token == ["600", "root", "K10test-token"], f"token file: {token}")
    check("NTP=ntp.racklet.invalid" in vm.run("cat /etc/systemd/timesyncd.conf.d/50-racklet.conf"), "NTP")
    check(vm.run("cat /var/lib/racklet/update/seed").strip() == "77", "wave seed")
    # (Counted in the guest: the bundles are 200 KB, slow over the serial console.)
    counts = vm.run(f"grep -c 'BEGIN CERTIFICATE' {SYSTEM_CA_BUNDLE} {IMAGE_CA_BUNDLE}").split()
    system_count, image_count = (int(line.rsplit(":", 1)[1]) for line in counts)
    tail = vm.run(f"tail -n {len(ca_pem.splitlines())} {SYSTEM_CA_BUNDLE}").replace("\r", "").strip()
    check(tail == ca_pem and image_count > 100 and system_count == image_count + 1,
          f"the card's CA is not at the end of {SYSTEM_CA_BUNDLE} (image bundle: {image_count} certificates, "
          f"system: {system_count}; its end: {tail[-200:]!r})")
    unit = vm.run("systemctl show -p ActiveState,Result racklet-node.service").split()
    check("ActiveState=active" in unit, f"racklet-node.service: {unit}")
    host_key = vm.run(f"for i in $(seq 120); do test -s {HOST_KEY} && break; sleep 1; done; cat {HOST_KEY}",
                      timeout=200).strip()
    check(host_key.startswith("ssh-ed25519 "), f"SSH host key: {host_key!r}")
    ctx.note(f"boot 1: {status['hostname']}, role {status['kubernetes_role']}, changed {status['changed']}")

    # 2. Changed on the card (here from the node itself): a new name, k3s off.
    vm.run("printf 'hostname = \"pi-8\"\\n' > /efi/racklet/settings.toml && sync")
    vm.reboot()
    boot_to_shell(vm, "a")
    check(vm.run("hostname").strip() == "pi-8", f"after the change: hostname {vm.run('hostname').strip()!r}")
    check(vm.run(f"cat {HOST_KEY}").strip() == host_key, "the SSH host key changed across a reboot")
    status = node_status(vm)
    check(status["kubernetes_role"] == "none", f"role: {status}")
    gone = vm.run("ls /run/racklet/k3s.env /etc/rancher/k3s/config.yaml /etc/rancher/k3s/token "
                  "/etc/systemd/timesyncd.conf.d/50-racklet.conf 2>&1", check=False)[1]
    check(gone.count("No such file") == 4, f"the removed settings' files should be gone: {gone}")
    code, output = vm.run(f"cmp {SYSTEM_CA_BUNDLE} {IMAGE_CA_BUNDLE}", check=False)
    check(code == 0, f"[trust] removed, yet the system CA bundle differs from the image's: {output.strip()}")
    # The card's seed is removed; the agent then draws one of its own.
    check("/var/lib/racklet/update/seed" in status["removed"], f"the card's wave seed was not removed: {status}")
    ctx.note(f"boot 2: {status['hostname']}, removed {status['removed']}")

    # 3. An invalid file: the node boots with pi-8's settings and says why.
    mark = vm.cursor
    vm.run("printf 'hostname = \"Pi_9\"\\n[kubernetes]\\nrole = \"agent\"\\n' > /efi/racklet/settings.toml && sync")
    vm.reboot()
    boot_to_shell(vm, "a")
    check(vm.run("hostname").strip() == "pi-8", f"an invalid file changed the name: {vm.run('hostname').strip()!r}")
    status = node_status(vm)
    error = status["settings_error"] or ""
    check(status["settings_source"] == "last-good" and "racklet/settings.toml" in error
          and 'hostname: "Pi_9"' in error and "kubernetes.server" in error, f"status: {status}")
    check("racklet-node: settings not applied" in vm.output[mark:], "the error is not on the console")
    journal = vm.run("journalctl -b -u racklet-node --no-pager -o cat", check=False)[1]
    check("settings not applied" in journal, f"the error is not in the journal: {journal[-400:]}")
    ctx.note(f"boot 3: kept {status['hostname']}; error: {error[:160]}")
    check(vm.poweroff() == 0, "QEMU did not exit cleanly after poweroff")


def ssh_key(ctx: Context, name: str) -> tuple[Path, str]:
    """A throwaway ed25519 key pair in the test's directory: (private key
    path, public key line)."""
    key = ctx.dir / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"racklet-test-{name}", "-f", str(key)],
                   check=True)
    return key, Path(f"{key}.pub").read_text().strip()


def ssh(port: int, key: Path | None, known_hosts: Path, command: str = "true",
        *options: str) -> subprocess.CompletedProcess:
    """OpenSSH's client to the guest's forwarded port, as root, batch mode
    (never a prompt), the host key checked against `known_hosts` only."""
    identity = ["-i", str(key), "-o", "IdentitiesOnly=yes"] if key else []
    return subprocess.run(["ssh", "-F", "/dev/null", "-p", str(port), *identity,
                           "-o", "BatchMode=yes", "-o", "ConnectTimeout=60",
                           "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes",
                           "-o", "GlobalKnownHostsFile=/dev/null", *options, "root@127.0.0.1", command],
                          capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)


def wait_for_sshd(vm: VM, port: int, known_hosts: Path) -> str:
    """Wait until the guest's ssh.service is active; write its host key (from
    /var) as the only known key for 127.0.0.1:port. Returns that key line."""
    state = vm.run("for i in $(seq 120); do systemctl is-active -q ssh.service && break; sleep 1; done; "
                   "systemctl is-active ssh.service", timeout=200, check=False)[1].strip()
    check(state == "active", f"ssh.service is {state!r}: "
          f"{vm.run('journalctl -b --no-pager -o cat -u ssh -u racklet-ssh-host-keys | tail -n 20', check=False)[1]}")
    host_key = vm.run(f"cat {HOST_KEY}").strip()
    check(host_key.startswith("ssh-ed25519 "), f"host key {host_key!r}")
    known_hosts.write_text(f"[127.0.0.1]:{port} {' '.join(host_key.split()[:2])}\n")
    return host_key


def ssh_access_checks(ctx: Context, vm: VM, port: int, key: Path, known_hosts: Path, hostname: str) -> str:
    """The card's [ssh] authorized_keys log in as root over SSH (OpenSSH's
    client, through QEMU's forward on 127.0.0.1); passwords, keyboard-
    interactive and other keys are refused; the host key is made at the first
    boot on /var (x86_settings_from_the_card: kept across reboots). Names
    resolve through systemd-resolved, with mDNS on for the Ethernet link.
    Returns the host key line."""
    stranger, _ = ssh_key(ctx, "stranger")
    host_key = wait_for_sshd(vm, port, known_hosts)
    mode = vm.run(f"stat -c '%a %U' {HOST_KEY.removesuffix('.pub')}; findmnt -n -o TARGET -T {HOST_KEY}").split()
    check(mode == ["600", "root", "/var"], f"host key: {mode}")

    result = ssh(port, key, known_hosts, "hostname; id -u")
    check(result.returncode == 0 and result.stdout.split() == [hostname, "0"],
          f"ssh with the card's key: {result.returncode} {result.stdout!r} {result.stderr.strip()}")
    result = ssh(port, None, known_hosts, "true", "-o", "PubkeyAuthentication=no",
                 "-o", "PreferredAuthentications=password,keyboard-interactive")
    check(result.returncode == 255 and "Permission denied (publickey)" in result.stderr,
          f"a password login was not refused as expected: {result.returncode} {result.stderr.strip()}")
    result = ssh(port, stranger, known_hosts)
    check(result.returncode == 255 and "Permission denied (publickey)" in result.stderr,
          f"a key not on the card was not refused: {result.returncode} {result.stderr.strip()}")
    effective = dict(line.split(" ", 1) for line in vm.run("sshd -T").splitlines() if " " in line)
    for name, want in [("passwordauthentication", "no"), ("kbdinteractiveauthentication", "no"),
                       ("permitrootlogin", "without-password"), ("authenticationmethods", "publickey")]:
        check(effective.get(name) == want, f"sshd -T: {name} {effective.get(name)!r}, expected {want!r}")
    ctx.note(f"root login with the card's key as {hostname}; password and stranger refused; "
             f"host key {host_key[:40]}...")
    # Name resolution: systemd-resolved with its stub in resolv.conf and mDNS on
    # the Ethernet link. (Answering as <hostname>.local needs a second host on
    # the link; QEMU's user network carries no multicast: not checked here.)
    mdns = vm.run("resolvectl mdns", check=False)[1]
    check(re.search(r"Link \d+ \(\w+\): yes", mdns), f"mDNS is not on for the Ethernet link: {mdns.strip()}")
    resolved = vm.run(f"systemctl is-active systemd-resolved; readlink /etc/resolv.conf; getent hosts {hostname}",
                      check=False)[1]
    check(resolved.split()[:2] == ["active", "../run/systemd/resolve/stub-resolv.conf"] and hostname in resolved,
          f"systemd-resolved, resolv.conf, nss: {resolved.strip()}")
    ctx.note(f"resolvectl mdns: {' '.join(mdns.split())}; resolved, resolv.conf, getent: {' '.join(resolved.split())}")
    return host_key


def boot_slots(vm: VM) -> list[dict]:
    """The agent's view of the slots (`racklet-update --json status`:
    boot_slots), waiting for the agent to be up after a boot."""
    text = vm.run("for i in $(seq 90); do racklet-update --json status > /tmp/rk-status.json 2>/dev/null"
                  " && break; sleep 2; done; cat /tmp/rk-status.json", timeout=240)
    report = json.loads(text[text.index("{"):])
    return [{key: entry.get(key) for key in ("slot", "version", "boot_state", "booted")}
            for entry in report["boot_slots"]]


def reset_checks(vm: VM, mark: int, machine_id: str, slots: list[dict], how: str,
                 ssh_access: tuple[int, Path, Path, str]) -> str:
    """After a factory reset boot: racklet-init said so, /var's token and the
    machine ID are gone, the card's settings are back (host name, SSH with the
    card's key, to a new host key), the flag is gone, the slots are as they
    were. Returns the new machine ID."""
    console = clean(vm.output[mark:])
    check(re.search(r"racklet-init: factory reset: the data partition is empty", console),
          f"{how}: racklet-init did not report the reset")
    check("racklet-init: factory reset: racklet/factory-reset removed from the ESP" in console,
          f"{how}: racklet-init did not remove the flag")
    check(vm.run("test -e /var/lib/racklet-test/token; echo $?").strip() == "1", f"{how}: the /var token survived")
    check(vm.run("test -e /etc/racklet-test-token; echo $?").strip() == "1", f"{how}: the /etc token survived")
    after = vm.run("cat /etc/machine-id").strip()
    check(re.fullmatch(r"[0-9a-f]{32}", after) and after != machine_id,
          f"{how}: machine-id {after!r} (before: {machine_id})")
    check(vm.run("hostname").strip() == "pi-reset", f"{how}: hostname {vm.run('hostname').strip()!r}")
    check(vm.run("test -e /efi/racklet/factory-reset; echo $?").strip() == "1", f"{how}: the flag is still there")
    check(vm.run("test -f /efi/racklet/settings.toml; echo $?").strip() == "0", f"{how}: the card's settings went")
    now = boot_slots(vm)
    check(now == slots, f"{how}: slots changed: {slots} -> {now}")
    port, key, known_hosts, old_host_key = ssh_access
    host_key = wait_for_sshd(vm, port, known_hosts)
    check(host_key != old_host_key, f"{how}: the SSH host key survived the reset")
    result = ssh(port, key, known_hosts, "hostname")
    check(result.returncode == 0 and result.stdout.strip() == "pi-reset",
          f"{how}: ssh with the card's key: {result.returncode} {result.stderr.strip()}")
    return after


@test(X86)
def x86_ssh_and_factory_reset(ctx: Context) -> None:
    """SSH with the card's keys on the first boot of a provisioned card
    (ssh_access_checks), then factory reset by command (racklet-node
    factory-reset) and by the flag racklet/factory-reset placed on the card's
    ESP: the next boot wipes /var and the /etc changes (a token, the machine
    ID), removes the flag, applies the card's settings again (SSH with the
    card's key to a new host key); the slots are as before."""
    image = ctx.image(X86)
    key, public = ssh_key(ctx, "laptop")
    overlay = provisioned_overlay(ctx, image, f'hostname = "pi-reset"\n[ssh]\nauthorized_keys = ["{public}"]\n')
    port = free_port()
    known_hosts = ctx.dir / "known_hosts"
    vm = ctx.vm(image, overlay, ssh_port=port)
    boot_to_shell(vm, "a")
    check(vm.run("hostname").strip() == "pi-reset", "provisioned hostname")
    host_key = ssh_access_checks(ctx, vm, port, key, known_hosts, "pi-reset")
    slots = boot_slots(vm)
    check(any(entry["slot"] == "a" and entry["booted"] for entry in slots), f"slots: {slots}")
    ctx.note(f"agent privileges: {check_agent_privileges(vm)}")

    def leave_traces() -> tuple[str, str]:
        token = secrets.token_hex(8)
        vm.run(f"mkdir -p /var/lib/racklet-test && echo {token} > /var/lib/racklet-test/token"
               f" && echo {token} > /etc/racklet-test-token && sync")
        return token, vm.run("cat /etc/machine-id").strip()

    # 1. By command: refused without confirmation when not on a terminal, then --yes.
    token, machine_id = leave_traces()
    code, output = vm.run("racklet-node factory-reset < /dev/null", check=False)
    check(code != 0 and "--yes" in output, f"an unconfirmed reset was not refused: {code} {output.strip()}")
    check(vm.run("test -e /efi/racklet/factory-reset; echo $?").strip() == "1", "a refused reset left the flag")
    text = vm.run("racklet-node --json factory-reset --yes")
    requested = json.loads(text[text.index("{"):])
    check(requested["ok"] and requested["requested"]["flag"] == "/efi/racklet/factory-reset", f"{requested}")
    mark = len(vm.output)
    vm.reboot()
    boot_to_shell(vm, "a")
    machine_id = reset_checks(vm, mark, machine_id, slots, "by command", (port, key, known_hosts, host_key))
    host_key = vm.run(f"cat {HOST_KEY}").strip()
    ctx.note(f"by command: token {token} gone, new machine-id {machine_id}")

    # 2. By the flag, placed on the card from a laptop (the node powered off).
    token, machine_id = leave_traces()
    check(vm.poweroff() == 0, "QEMU did not exit cleanly after poweroff")
    patch_esp(overlay, {"racklet/factory-reset": b""})
    mark = len(vm.output)
    boot_to_shell(vm, "a")
    machine_id = reset_checks(vm, mark, machine_id, slots, "by the ESP flag", (port, key, known_hosts, host_key))
    ctx.note(f"by the ESP flag: token {token} gone, new machine-id {machine_id}")
    check(vm.poweroff() == 0, "QEMU did not exit cleanly after poweroff")
    check("factory-reset" not in esp_listing(overlay, "racklet"), "the flag is on the ESP after the test")


# ---------------------------------------------------------------------------
# aarch64: U-Boot (distro boot) -> boot.scr -> UKI


@test(ARM)
def aarch64_uboot_boots_slot_a(ctx: Context) -> None:
    """U-Boot runs boot.scr, which boots slot A's UKI onto the verified root;
    the first boot of a provisioned card takes the card's settings: a
    settings.toml from racklet-image provision (host name, k3s server role
    with cluster-init) beside the cloud-init NoCloud user-data a Raspberry Pi
    Imager-style tool writes (host name, time zone, a user's SSH key, a
    package list): the user-data key lets root in over SSH, the time zone is
    applied, settings.toml wins the host name, the package list and the
    user's groups are reported as not applied."""
    image = ctx.image(ARM)
    # A card provisioned as a Pi would be: its first boot takes the name and key.
    key, public = ssh_key(ctx, "laptop")
    overlay = provisioned_overlay(
        ctx, image, 'hostname = "pi-arm-1"\n[kubernetes]\nrole = "server"\ncluster_init = true\n')
    user_data = ("#cloud-config\nhostname: imager-name\nssh_pwauth: false\ntimezone: Europe/Berlin\n"
                 f"users:\n  - name: pi\n    groups: [sudo]\n    ssh_authorized_keys:\n      - {public}\n"
                 "packages: [htop]\n")
    patch_esp(overlay, {"user-data": user_data.encode()})
    before = read_states(overlay)
    check(all(before), f"the image's state copies do not decode: {before}")
    port = free_port()
    vm = ctx.vm(image, overlay, ssh_port=port)
    vm.start()
    decision = uboot_decision(vm)
    check("order a," in decision and "committed a" in decision, f"boot script: {decision}")
    vm.expect(r"Booting /EFI\\Linux\\racklet-a\.efi", timeout=120, fail=BOOT_FAILURE)
    times = boot_to_shell(vm, "a")
    root_checks(vm, image, "a")
    vm.run("systemctl is-system-running --wait", timeout=300, check=False)
    active = vm.run("systemctl is-active containerd.service", check=False)[1].strip()
    check(active == "active", f"containerd is {active!r}")
    hostname = vm.run("hostname").strip()
    status = node_status(vm)
    check(hostname == "pi-arm-1" and status["settings_source"] == "card",
          f"the card's host name: {hostname!r}; racklet-node status: {status}")
    cloud_init = status.get("cloud_init") or {}
    check(cloud_init.get("files") == ["user-data"] and cloud_init.get("overridden") == ["hostname"]
          and "user-data: packages" in cloud_init.get("ignored", [])
          and "user-data: users[0].groups" in cloud_init.get("ignored", []) and not cloud_init.get("refused"),
          f"cloud-init in racklet-node status: {cloud_init}")
    check(status["kubernetes_role"] == "server" and status["ssh_authorized_keys"] == 1, f"status: {status}")
    zone = vm.run("readlink /etc/localtime; env -u TZ date -d @1796320666 +%Z").split()
    check(zone == ["../usr/share/zoneinfo/Europe/Berlin", "CET"], f"the user-data's time zone: {zone}")
    config = vm.run("cat /run/racklet/k3s.env /etc/rancher/k3s/config.yaml")
    check("K3S_ROLE=server" in config and "cluster-init: true" in config and 'node-name: "pi-arm-1"' in config
          and "server:" not in config, f"k3s.env and config.yaml of the first server:\n{config}")
    known_hosts = ctx.dir / "known_hosts"
    wait_for_sshd(vm, port, known_hosts)
    result = ssh(port, key, known_hosts, "hostname")
    check(result.returncode == 0 and result.stdout.strip() == "pi-arm-1",
          f"ssh with the card's key: {result.returncode} {result.stdout!r} {result.stderr.strip()}")
    check(vm.poweroff() == 0, "QEMU did not exit cleanly after poweroff")
    after = read_states(overlay)
    # The boot is counted by U-Boot (copy 2: sequence 2, boot 1 of A) and,
    # once the health gate passed, confirmed by the agent (copy 1: sequence
    # 3, A's boots back to 0); nothing else changes.
    counted = {**before[0], "racklet_seq": "2", "racklet_boots_a": "1"}
    confirmed = {**before[0], "racklet_seq": "3"}
    check(after[1] == counted and after[0] in (before[0], confirmed),
          f"a committed boot should be counted, then confirmed: {before} -> {after}")
    ctx.note(f"{decision}; kernel at {times['kernel']:.1f} s, racklet-init done at {times['init']:.1f} s, "
             f"autologin at {times['login']:.1f} s")


@test(ARM)
def aarch64_uboot_try_b_then_fall_back(ctx: Context) -> None:
    """One try of slot B is recorded (tries_b 1 -> 0) before B boots; B fails;
    the next pass skips B and boots A."""
    image = ctx.image(ARM)
    overlay = ctx.overlay(image)
    older = state(1, "a")
    newer = state(2, "b a", tries_b=1)
    patch_esp(overlay, {"EFI/Linux/racklet-b.efi": image.broken_uki_b(),
                        "racklet/state-1.env": encode_uboot_env(older),
                        "racklet/state-2.env": encode_uboot_env(newer)})
    vm = ctx.vm(image, overlay)
    vm.start()
    decision = uboot_decision(vm)
    check("state copy 2 (sequence 2): order b a" in decision and "b=1" in decision, f"first pass: {decision}")
    vm.expect(r"racklet: trying slot b \(0 tries left after this one\)", timeout=60)
    vm.expect(r"Booting /EFI\\Linux\\racklet-b\.efi", timeout=120)
    first = vm.expect(KERNEL_CMDLINE, timeout=300)
    check("racklet.slot=b" in first.group(1), f"slot B's kernel has {first.group(1)}")
    vm.expect(r"racklet-init: FATAL: slot b[^\r\n]*\r?\n", timeout=300, fail=AUTOLOGIN)
    decision = uboot_decision(vm)
    check("state copy 1 (sequence 3): order b a" in decision and "b=0" in decision, f"second pass: {decision}")
    vm.expect(r"racklet: slot b has no tries left; skipping it", timeout=60)
    # A, the committed slot, boots counted (this file has no boots yet: 0).
    vm.expect(r"racklet: booting committed slot a \(boot 1 of 3 ", timeout=60)
    vm.expect(r"Booting /EFI\\Linux\\racklet-a\.efi", timeout=120)
    boot_to_shell(vm, "a")
    root_checks(vm, image, "a")
    check(vm.poweroff() == 0, "QEMU did not exit cleanly after poweroff")
    copies = read_states(overlay)
    # Copy 1: the try, written by U-Boot (sequence 3; the boot counts of a file
    # written before they existed read as 0), or, once A's health gate passed,
    # the agent's confirmation of A's boot (sequence 5). Copy 2: U-Boot's count
    # of A's boot (sequence 4).
    tried = {**state(3, "b a", tries_b=0), "racklet_boots_a": "0", "racklet_boots_b": "0"}
    counted = {**tried, "racklet_seq": "4", "racklet_boots_a": "1"}
    confirmed = {**tried, "racklet_seq": "5"}
    check(copies[1] == counted, f"state-2.env (A's boot, counted by U-Boot): {copies[1]}")
    check(copies[0] in (tried, confirmed), f"state-1.env: {copies[0]}")
    esp_fsck(overlay)
    ctx.note(f"B tried once, then skipped; A counted; state copies {copies}")


@test(ARM)
def aarch64_uboot_damaged_newer_copy(ctx: Context) -> None:
    """A newer state copy with a bad CRC is ignored in favour of the older valid one."""
    image = ctx.image(ARM)
    overlay = ctx.overlay(image)
    valid = encode_uboot_env(state(6, "a"))
    # The torn newer copy would have sent us to B.
    torn = damaged(encode_uboot_env(state(7, "b a", tries_b=1)))
    check(decode_uboot_env(torn) is None, "the damaged copy still decodes")
    patch_esp(overlay, {"EFI/Linux/racklet-b.efi": image.uki_b.read_bytes(),
                        "racklet/state-1.env": torn, "racklet/state-2.env": valid})
    vm = ctx.vm(image, overlay, no_reboot=True)
    vm.start()
    decision = uboot_decision(vm)
    check("state copy 2 (sequence 6): order a," in decision, f"boot script: {decision}")
    vm.expect(r"Booting /EFI\\Linux\\racklet-a\.efi", timeout=120,
              fail=r"racklet: trying slot b|racklet-b\.efi")
    cmdline = vm.expect(KERNEL_CMDLINE, timeout=300)
    check("racklet.slot=a" in cmdline.group(1), cmdline.group(1))
    vm.expect(INIT_OK, timeout=300, fail=BOOT_FAILURE)
    vm.kill()
    copies = read_states(overlay)
    # The boot of A is counted in place of the torn copy; the valid one stays
    # (or carries the agent's confirmation, if A's health gate passed first).
    check(copies[0] == {**state(7, "a"), "racklet_boots_a": "1", "racklet_boots_b": "0"},
          f"state-1.env should be the counted boot of A replacing the torn copy: {copies[0]}")
    check(copies[1] in (decode_uboot_env(valid), {**state(8, "a"), "racklet_boots_a": "0", "racklet_boots_b": "0"}),
          f"state-2.env: {copies[1]}")
    ctx.note(decision)


@test(ARM)
def aarch64_uboot_both_copies_damaged(ctx: Context) -> None:
    """Both copies damaged: the committed slot boots (A by default, B with the
    racklet/committed-b marker)."""
    image = ctx.image(ARM)
    for committed in ("a", "b"):
        overlay = ctx.overlay(image, f"disk-{committed}")
        files = {"EFI/Linux/racklet-b.efi": image.uki_b.read_bytes(),
                 "racklet/state-1.env": damaged(encode_uboot_env(state(4, "b a", tries_b=1))),
                 "racklet/state-2.env": damaged(encode_uboot_env(state(5, "b a", tries_b=1)))}
        if committed == "b":
            files["racklet/committed-b"] = b""
        patch_esp(overlay, files)
        vm = ctx.vm(image, overlay, label=f"committed-{committed}", no_reboot=True)
        vm.start()
        decision = uboot_decision(vm)
        check(decision == f"racklet: no valid boot state; booting the committed slot {committed}",
              f"committed {committed}: {decision}")
        vm.expect(rf"Booting /EFI\\Linux\\racklet-{committed}\.efi", timeout=120, fail=r"racklet: trying slot")
        cmdline = vm.expect(KERNEL_CMDLINE, timeout=300)
        check(f"racklet.slot={committed}" in cmdline.group(1), cmdline.group(1))
        if committed == "a":
            vm.expect(INIT_OK, timeout=300, fail=BOOT_FAILURE)
        vm.kill()
        ctx.note(f"committed {committed}: {decision}")


@test(ARM)
def aarch64_uboot_sequence_past_9(ctx: Context) -> None:
    """The try counter still works once the sequence number passes 9
    (U-Boot's setexpr counts in hex: 9 + 1 = "a")."""
    image = ctx.image(ARM)
    overlay = ctx.overlay(image)
    patch_esp(overlay, {"EFI/Linux/racklet-b.efi": image.uki_b.read_bytes(),
                        "racklet/state-1.env": encode_uboot_env(state(9, "b a", tries_b=1)),
                        "racklet/state-2.env": encode_uboot_env(state(8, "a"))})
    vm = ctx.vm(image, overlay, label="try", no_reboot=True)
    vm.start()
    decision = uboot_decision(vm)
    check("state copy 1 (sequence 9)" in decision, decision)
    vm.expect(r"racklet: trying slot b", timeout=60)
    vm.expect(r"Booting /EFI\\Linux\\racklet-b\.efi", timeout=120)
    vm.kill()
    written = read_states(overlay)[1]
    ctx.note(f"after the try, state-2.env = {written}")
    check(written and written["racklet_tries_b"] == "0", f"state-2.env after the try: {written}")
    esp_fsck(overlay)
    vm = ctx.vm(image, overlay, label="next", no_reboot=True)
    vm.start()
    decision = uboot_decision(vm)
    ctx.note(f"next boot: {decision}")
    check("b=0" in decision, f"the boot after the try must use the written copy (tries b=0): {decision}")
    vm.expect(r"Booting /EFI\\Linux\\racklet-a\.efi", timeout=120, fail=r"racklet: trying slot b")
    vm.kill()


# ---------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", default=[],
                        help="run only these tests (comma-separated names or prefixes; repeatable)")
    parser.add_argument("--list", action="store_true", help="list the tests and exit")
    parser.add_argument("--build", type=Path, default=REPO / "build",
                        help="directory holding qemu-x86_64/ and qemu-aarch64/ (default: build/)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="scratch directory (default: a new one under /tmp); serial logs stay there")
    parser.add_argument("--memory", type=int, default=1024, help="guest RAM in MiB (default 1024)")
    parser.add_argument("--boot-cmd", type=Path, default=None,
                        help="aarch64: replace boot.scr on each overlay with this boot.cmd (compiled by mkimage)")
    parser.add_argument("--keep", action="store_true", help="keep overlays and image copies")
    options = parser.parse_args()

    if options.list:
        for name, variants, function in TESTS:
            print(f"{name:40} {','.join(variants):14} {function.__doc__.splitlines()[0]}")
        return 0
    wanted = [word for item in options.only for word in item.split(",") if word]
    selected = [t for t in TESTS if not wanted or any(t[0] == w or t[0].startswith(w) for w in wanted)]
    if not selected:
        print(f"no test matches {wanted}; --list shows them", file=sys.stderr)
        return 2

    scratch = options.workdir or Path(tempfile.mkdtemp(prefix="racklet-vmtest-"))
    scratch.mkdir(parents=True, exist_ok=True)
    print(f"scratch directory: {scratch}", flush=True)
    variants = sorted({v for _, vs, _ in selected for v in vs})
    images: dict[str, Image] = {}
    setup_error: dict[str, str] = {}
    for variant in variants:
        missing = require_tools(ARCH[variant])
        if missing:
            setup_error[variant] = "missing host tools: " + ", ".join(missing)
            continue
        try:
            images[variant] = Image(variant, options.build, scratch)
        except Exception as error:  # noqa: BLE001
            setup_error[variant] = str(error)

    passed = failed = 0
    for name, test_variants, function in selected:
        started = time.monotonic()
        problem = next((setup_error[v] for v in test_variants if v in setup_error), None)
        ctx = None
        try:
            if problem:
                raise HarnessError(problem)
            ctx = Context(name, scratch, images, options)
            function(ctx)
        except Exception as error:  # noqa: BLE001
            failed += 1
            elapsed = time.monotonic() - started
            kind = "" if isinstance(error, (TestFailure, HarnessError)) else f"{type(error).__name__}: "
            print(f"FAIL {name} ({elapsed:.0f} s): {kind}{error}", flush=True)
            if not isinstance(error, (TestFailure, HarnessError)):
                traceback.print_exc()
            if ctx:
                for note in ctx.notes:
                    print(f"     note: {note}")
                for vm in ctx.vms:
                    if isinstance(error, TestFailure) or "last 60 lines" not in str(error):
                        print(vm.tail(60))
                    print(f"     serial log: {vm.log_path}")
        else:
            passed += 1
            print(f"ok   {name} ({time.monotonic() - started:.0f} s)", flush=True)
            for note in ctx.notes:
                print(f"     {note}")
        finally:
            if ctx:
                ctx.close()
                if not options.keep:
                    for overlay in [*ctx.dir.glob("*.qcow2"), *ctx.dir.glob("*.raw")]:
                        overlay.unlink()
    if not options.keep:
        shutil.rmtree(scratch / "images", ignore_errors=True)
    print(f"serial logs: {scratch}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
