"""A small, stdlib-only harness for booting Racklet OS disk images under QEMU.

What it does:

* `Overlay`: a qcow2 overlay over a raw disk image (the ESP must stay
  writable, so no `-snapshot`), with helpers to read and patch bytes and to
  edit the ESP with mtools (the ESP is copied out to a raw file, edited, and
  the changed 64 KiB chunks are written back with `qemu-io`).
* `VM`: one QEMU process (x86_64: q35 + OVMF -> systemd-boot; aarch64:
  `-machine virt` + Debian's u-boot-qemu) with the serial console on a pair
  of FIFOs (not a unix socket: QEMU writes the console one byte per write,
  a unix socket holds only a few hundred such writes, and QEMU's UART drops
  characters once its writes block; a FIFO made 1 MiB big holds minutes of
  console output while this process waits for a CPU). Everything the guest
  prints is appended to a log file; `expect()` waits for a regular expression, `run()` types a command on the autologin
  root shell and returns its output and exit status.

Always `-accel tcg`: /dev/kvm on these machines hangs instead of failing.
Timeouts are generous because TCG on two cores is slow.
"""

from __future__ import annotations

import codecs
import fcntl
import json
import os
import re
import select
import shutil
import socket
import subprocess
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
UBOOT_QEMU_ARM64 = Path("/usr/lib/u-boot/qemu_arm64/u-boot.bin")

# vCPUs per guest: 2, or RACKLET_VM_CPUS. tests/run-all.sh runs two guests
# at once on two cores with 1 each: an x86_64 guest with 2 vCPUs on an
# overcommitted host was seen to hang at boot (RCU stalls: a halted vCPU's
# timer wakeup never came).
VM_CPUS = int(os.environ.get("RACKLET_VM_CPUS", "2"))

# Boot to the autologin shell: 10-40 s seen under TCG; leave a lot of room.
BOOT_TIMEOUT = 300
SERIAL_BUFFER = 1 << 20  # bytes of console output QEMU can write while the reader waits
COMMAND_TIMEOUT = 120

ANSI_ESCAPE = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|[()][0-9A-Za-z]|[=>])")
# agetty prints `<host> login: root (automatic login)` for the test variants.
AUTOLOGIN = re.compile(r"login: root \(automatic login\)")
# The autologin shell never came: stop waiting at once.
LOGIN_FAILURE = re.compile(r"(login: PAM Failure|Kernel panic|racklet-init: FATAL)[^\r\n]*\r?\n"
                           r"|Login incorrect")


class HarnessError(Exception):
    """A failure of the harness or of an expectation; carries the log tail."""


class TestFailure(AssertionError):
    """A test's expectation did not hold (raised by `check`)."""


def check(condition, message: str) -> None:
    if not condition:
        raise TestFailure(message)


class ExpectTimeout(HarnessError):
    pass


class VMExited(HarnessError):
    pass


def clean(text: str) -> str:
    """Serial output as plain text: no ANSI escapes, no carriage returns."""
    return ANSI_ESCAPE.sub("", text).replace("\r", "")


def _check_call(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise HarnessError(f"{' '.join(map(str, command))} failed ({result.returncode}): "
                           f"{result.stderr.strip() or result.stdout.strip()}")
    return result


def require_tools(arch: str) -> list[str]:
    """Missing host files/tools for `arch`, as `what (package)` strings."""
    missing = []
    tools = {"qemu-img": "qemu-utils", "qemu-io": "qemu-utils", "mcopy": "mtools",
             "sfdisk": "fdisk"}
    tools["qemu-system-x86_64" if arch == "x86_64" else "qemu-system-aarch64"] = (
        "qemu-system-x86" if arch == "x86_64" else "qemu-system-arm")
    for tool, package in tools.items():
        if shutil.which(tool) is None:
            missing.append(f"{tool} ({package})")
    files = [(OVMF_CODE, "ovmf"), (OVMF_VARS, "ovmf")] if arch == "x86_64" else [(UBOOT_QEMU_ARM64, "u-boot-qemu")]
    for path, package in files:
        if not path.exists():
            missing.append(f"{path} ({package})")
    return missing


# ---------------------------------------------------------------------------
# Disk images


@dataclass
class Partition:
    number: int
    name: str
    start: int  # bytes
    size: int  # bytes
    uuid: str
    type: str


def partitions(raw_image: Path) -> dict[str, Partition]:
    """The GPT of a raw image, by partition name (`sfdisk --json`)."""
    table = json.loads(_check_call(["sfdisk", "--json", str(raw_image)]).stdout)["partitiontable"]
    sector = table.get("sectorsize", 512)
    result = {}
    for index, entry in enumerate(table["partitions"], start=1):
        # The node is `<image><number>`; its number is the kernel's vdaN.
        found = re.search(r"(\d+)$", entry["node"])
        number = int(found.group(1)) if found else index
        result[entry.get("name", str(number))] = Partition(
            number, entry.get("name", ""), entry["start"] * sector, entry["size"] * sector,
            entry["uuid"].lower(), entry["type"])
    return result


class Overlay:
    """A qcow2 overlay over a raw base image. Never modifies the base."""

    CHUNK = 64 * 1024

    def __init__(self, base: Path, path: Path, base_format: str = "raw", layout: Path | None = None):
        """`base`: a raw image, or (base_format="qcow2") a frozen overlay of one,
        e.g. the disk of a saved VM state; `layout`: the raw image whose GPT
        gives the partitions (default: `base`)."""
        self.base = Path(base).resolve()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self.path.unlink()
        _check_call(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(self.base), "-F", base_format,
                     str(self.path)])
        self.partitions = partitions(layout or self.base)

    def write(self, offset: int, data: bytes) -> None:
        """Write bytes at a byte offset of the virtual disk (VM must be stopped)."""
        self.write_many([(offset, data)])

    def write_many(self, pieces: list[tuple[int, bytes]]) -> None:
        if not pieces:
            return
        scratch = self.path.with_suffix(".piece")
        commands = []
        files = []
        for index, (offset, data) in enumerate(pieces):
            piece = scratch.with_name(f"{scratch.name}{index}")
            piece.write_bytes(data)
            files.append(piece)
            commands += ["-c", f"write -q -s {piece} {offset} {len(data)}"]
        try:
            # qemu-io opens the image with write locks: it fails while a VM runs.
            _check_call(["qemu-io", "-f", "qcow2", *commands, str(self.path)])
        finally:
            for piece in files:
                piece.unlink(missing_ok=True)

    def read(self, offset: int, length: int, block: int = 512) -> bytes:
        """Read bytes from the virtual disk (through the overlay)."""
        first = offset // block
        last = -(-(offset + length) // block)
        out = self.path.with_suffix(".read")
        out.unlink(missing_ok=True)
        # qemu-img dd counts `count` from the start of the input, skipped blocks included.
        _check_call(["qemu-img", "dd", "-f", "qcow2", "-O", "raw", f"bs={block}", f"skip={first}",
                     f"count={last}", f"if={self.path}", f"of={out}"])
        data = out.read_bytes()
        out.unlink()
        if len(data) != (last - first) * block:
            raise HarnessError(f"qemu-img dd read {len(data)} bytes, expected {(last - first) * block}")
        start = offset - first * block
        return data[start:start + length]

    def partition(self, name: str) -> Partition:
        return self.partitions[name]

    def extract_partition(self, name: str, destination: Path) -> Path:
        part = self.partitions[name]
        destination.unlink(missing_ok=True)
        block = 1024 * 1024 if part.start % (1024 * 1024) == 0 and part.size % (1024 * 1024) == 0 else 512
        _check_call(["qemu-img", "dd", "-f", "qcow2", "-O", "raw", f"bs={block}",
                     f"skip={part.start // block}", f"count={(part.start + part.size) // block}",
                     f"if={self.path}", f"of={destination}"])
        if destination.stat().st_size != part.size:
            raise HarnessError(f"extracted {destination.stat().st_size} bytes of partition {name}, "
                               f"expected {part.size}")
        return destination

    def esp(self) -> "EspEditor":
        return EspEditor(self)


class EspEditor:
    """Edit the ESP of an overlay with mtools: `with overlay.esp() as esp: ...`.

    On exit (without an exception) the 64 KiB chunks that changed are written
    back into the overlay."""

    def __init__(self, overlay: Overlay):
        self.overlay = overlay
        self.image = overlay.path.with_suffix(".esp.raw")
        self.original: bytes | None = None

    def __enter__(self) -> "EspEditor":
        self.overlay.extract_partition("esp", self.image)
        self.original = self.image.read_bytes()
        return self

    def __exit__(self, kind, value, traceback) -> None:
        try:
            if kind is None:
                self.commit()
        finally:
            self.image.unlink(missing_ok=True)

    def commit(self) -> None:
        new = self.image.read_bytes()
        assert len(new) == len(self.original)
        start = self.overlay.partitions["esp"].start
        pieces = []
        chunk = Overlay.CHUNK
        run_start = None
        for offset in range(0, len(new) + chunk, chunk):
            changed = offset < len(new) and new[offset:offset + chunk] != self.original[offset:offset + chunk]
            if changed and run_start is None:
                run_start = offset
            elif not changed and run_start is not None:
                pieces.append((start + run_start, new[run_start:offset]))
                run_start = None
        self.overlay.write_many(pieces)
        self.original = new

    def _m(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [tool, "-i", str(self.image), *args]
        result = subprocess.run(command, capture_output=True)
        if check and result.returncode != 0:
            raise HarnessError(f"{' '.join(command)}: {result.stderr.decode(errors='replace').strip()}")
        return result

    def listdir(self, directory: str) -> list[str]:
        out = self._m("mdir", "-b", f"::/{directory}", check=False)
        if out.returncode != 0:
            return []
        names = []
        for line in out.stdout.decode(errors="replace").splitlines():
            line = line.strip()
            if line:
                names.append(line.rstrip("/").split("/")[-1])
        return sorted(names)

    def read(self, path: str) -> bytes | None:
        out = self._m("mtype", f"::/{path}", check=False)
        return out.stdout if out.returncode == 0 else None

    def write(self, path: str, data: bytes) -> None:
        parent = "/".join(path.split("/")[:-1])
        if parent:
            parts = parent.split("/")
            for depth in range(1, len(parts) + 1):
                self._m("mmd", f"::/{'/'.join(parts[:depth])}", check=False)
        source = self.image.with_suffix(".put")
        source.write_bytes(data)
        try:
            self._m("mcopy", "-o", str(source), f"::/{path}")
        finally:
            source.unlink(missing_ok=True)

    def delete(self, path: str) -> None:
        self._m("mdel", f"::/{path}")

    def rename(self, old: str, new_name: str) -> None:
        self._m("mren", f"::/{old}", new_name)


def copy_sparse(source: Path, destination: Path) -> None:
    """A copy of a (sparse) disk image that keeps its holes."""
    _check_call(["cp", "--sparse=always", str(source), str(destination)])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------------------
# QEMU


class VM:
    """One QEMU process with its serial console on a pair of FIFOs."""

    def __init__(self, arch: str, disk: Overlay | Path, workdir: Path, name: str, *,
                 no_reboot: bool = False, memory: int = 2048, cpus: int = VM_CPUS,
                 ovmf_vars: Path | None = None, extra_args: list[str] | None = None,
                 incoming: Path | None = None, monitor: bool = False, ssh_port: int | None = None):
        """`incoming`: a VM state saved by `save_state()` to resume from on the
        first start (its disk must be an overlay of the saved disk, its OVMF
        variables a copy of the saved ones); later starts boot. `monitor`: a
        human monitor on a unix socket (needed by `save_state()`). `ssh_port`:
        a user-mode network (restricted: the guest reaches nothing) whose only
        forward is 127.0.0.1:ssh_port on the host to the guest's port 22."""
        assert arch in ("x86_64", "aarch64"), arch
        self.arch = arch
        self.disk = disk.path if isinstance(disk, Overlay) else Path(disk)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.no_reboot = no_reboot
        self.memory = memory
        self.cpus = cpus
        self.extra_args = extra_args or []
        self.log_path = self.workdir / f"{name}.serial.log"
        # QEMU's pipe chardev: it reads <serial_path>.in, writes <serial_path>.out.
        self.serial_path = Path(f"/tmp/rk-{uuid.uuid4().hex[:10]}.serial")
        self.incoming = incoming
        self.ssh_port = ssh_port
        self.monitor_path = self.serial_path.with_suffix(".monitor") if monitor else None
        # One VARS copy per test: reused across the reboots of this VM object
        # (and by later VM objects of the same test if passed in), never shared.
        if arch == "x86_64":
            self.ovmf_vars = ovmf_vars or self.workdir / f"{name}.OVMF_VARS.fd"
            if not self.ovmf_vars.exists():
                shutil.copyfile(OVMF_VARS, self.ovmf_vars)
        else:
            self.ovmf_vars = None
        self.process: subprocess.Popen | None = None
        self._serial_in: int | None = None  # our write end of <serial_path>.in
        self._serial_out: int | None = None  # our read end of <serial_path>.out
        self._reader: threading.Thread | None = None
        self._qemu_reader: threading.Thread | None = None
        self._qemu_said: list[str] = []  # QEMU's own stdout/stderr lines, this start
        self._lock = threading.Condition()
        self._buffer = ""
        self._chunks: list[tuple[float, int]] = []  # (arrival time, buffer offset)
        self._eof = False
        self.cursor = 0
        self.started_at = 0.0
        self._log = None

    # -- process -----------------------------------------------------------

    def command(self) -> list[str]:
        serial = ["-chardev", f"pipe,id=ser0,path={self.serial_path}", "-serial", "chardev:ser0"]
        monitor = f"unix:{self.monitor_path},server=on,wait=off" if self.monitor_path else "none"
        common = ["-accel", "tcg", "-smp", str(self.cpus), "-m", str(self.memory),
                  "-display", "none", "-monitor", monitor, "-nic", "none", "-no-user-config",
                  *serial]
        if self.ssh_port:
            index = common.index("-nic")
            common[index:index + 2] = [
                "-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
                "-device", "virtio-net-pci,netdev=n0"]
        if self.no_reboot:
            common.append("-no-reboot")
        if self.incoming:
            common += ["-incoming", f"exec:cat {self.incoming}"]
        if self.arch == "x86_64":
            return ["qemu-system-x86_64", "-machine", "q35", *common,
                    "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                    "-drive", f"if=pflash,format=raw,unit=1,file={self.ovmf_vars}",
                    "-drive", f"if=none,id=disk0,format=qcow2,file={self.disk}",
                    "-device", "virtio-blk-pci,drive=disk0",
                    *self.extra_args]
        return ["qemu-system-aarch64", "-machine", "virt", "-cpu", "cortex-a72", *common,
                "-bios", str(UBOOT_QEMU_ARM64),
                "-drive", f"if=none,id=disk0,format=qcow2,file={self.disk}",
                "-device", "virtio-blk-pci,drive=disk0",
                *self.extra_args]

    def _serial_fifo(self, suffix: str) -> Path:
        return self.serial_path.with_name(self.serial_path.name + suffix)

    def _open_serial(self) -> None:
        """Fresh FIFOs for this start, opened before QEMU starts so that its
        first output is kept: the read end non-blocking (polled by the reader
        thread; it sees EOF once QEMU, the only writer, has exited), the write
        end read-write so that opening it does not wait for QEMU."""
        self._close_serial()
        for suffix in (".in", ".out"):
            self._serial_fifo(suffix).unlink(missing_ok=True)
            os.mkfifo(self._serial_fifo(suffix), 0o600)
        self._serial_out = os.open(self._serial_fifo(".out"), os.O_RDONLY | os.O_NONBLOCK)
        self._serial_in = os.open(self._serial_fifo(".in"), os.O_RDWR)
        try:
            fcntl.fcntl(self._serial_out, fcntl.F_SETPIPE_SZ, SERIAL_BUFFER)
        except OSError:
            pass  # above /proc/sys/fs/pipe-max-size: the default 64 KiB still beats a socket

    def _release_serial(self) -> None:
        """Once QEMU is gone: let the reader take the last output, then close
        and remove the FIFOs."""
        if self._reader:
            self._reader.join(timeout=5)
        self._close_serial()

    def _close_serial(self) -> None:
        for fd in (self._serial_in, self._serial_out):
            if fd is not None:
                os.close(fd)
        self._serial_in = self._serial_out = None
        for suffix in (".in", ".out"):
            self._serial_fifo(suffix).unlink(missing_ok=True)

    def start(self) -> "VM":
        assert self.process is None or self.process.poll() is not None, "already running"
        if self._reader:
            self._reader.join(timeout=5)
        self._log = open(self.log_path, "ab", buffering=0)
        command = self.command()
        self._log.write(f"\n===== harness: starting {self.name}: {' '.join(command)}\n".encode())
        self._open_serial()
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.incoming = None  # resumed once; a restart boots
        self._eof = False
        self.started_at = time.monotonic()
        self._reader = threading.Thread(target=self._read_loop, args=(self._serial_out, self.process),
                                        daemon=True)
        self._reader.start()
        self._qemu_said = []
        self._qemu_reader = threading.Thread(target=self._stderr_loop, daemon=True)
        self._qemu_reader.start()
        return self

    def _stderr_loop(self) -> None:
        process = self.process
        for line in process.stdout:
            text = line.decode(errors="replace").rstrip()
            self._qemu_said.append(text)
            if self._log:
                self._log.write(f"\n===== qemu: {text}\n".encode())

    def _exit_report(self) -> str:
        """After the console's EOF: QEMU's exit status and what QEMU itself
        printed (why it would not start: a bad option, a missing file)."""
        if self._qemu_reader:
            self._qemu_reader.join(timeout=2)
        try:
            status = self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            status = None
        said = "\n".join(self._qemu_said[-20:])
        return f"QEMU exit status {status}" + (f"; QEMU said:\n{said}" if said else "")

    def _read_loop(self, fd: int, process: subprocess.Popen) -> None:
        # Incremental: a UTF-8 character may be split across two reads.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while True:
            try:
                # Before QEMU opens the FIFO nothing is reported; once QEMU,
                # the only writer, has gone, POLLHUP and a read of b"".
                events = poller.poll(1000)
                data = os.read(fd, 1 << 20) if events else None
            except BlockingIOError:
                data = None
            except OSError:
                data = b""
            if data is None and process.poll() is not None:
                data = b""  # QEMU exited before it opened the FIFO
            if data is None:
                continue
            if not data:
                with self._lock:
                    self._eof = True
                    self._lock.notify_all()
                return
            if self._log:
                self._log.write(data)
            text = decoder.decode(data)
            with self._lock:
                self._chunks.append((time.monotonic(), len(self._buffer)))
                self._buffer += text
                self._lock.notify_all()

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_exit(self, timeout: float = BOOT_TIMEOUT) -> int:
        """Wait for QEMU to exit (poweroff, or a reset under -no-reboot)."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ExpectTimeout(f"{self.name}: QEMU still running after {timeout:.0f} s\n{self.tail()}") from None
        if self._reader:
            self._reader.join(timeout=5)
        self.note(f"QEMU exited with status {code}")
        return code

    def hmp(self, command: str, timeout: float = 60) -> str:
        """One human-monitor command (VM made with monitor=True); its output."""
        if not self.monitor_path:
            raise HarnessError(f"{self.name}: started without a monitor")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.monitor_path))
            received = b""
            for line in (None, command):
                if line is not None:
                    sock.sendall(line.encode() + b"\n")
                    received = b""
                while not received.endswith(b"(qemu) "):
                    data = sock.recv(65536)
                    if not data:
                        raise HarnessError(f"{self.name}: the monitor closed during {command!r}")
                    received += data
        text = clean(received.decode(errors="replace"))
        return text[text.find("\n") + 1:].removesuffix("(qemu) ").strip()

    def save_state(self, path: Path, timeout: float = 300) -> None:
        """Save the guest's whole state (RAM, devices) to `path` and quit
        QEMU. The disk overlay (and OVMF variables) are then frozen: later
        VMs resume from the state on overlays of them (`incoming`)."""
        # Not `stop` first: the state would carry "paused" and the VMs resumed
        # from it would stay paused. Migration stops the (idle) guest itself.
        self.hmp(f'migrate "exec:cat > {path}"')
        deadline = time.monotonic() + timeout
        while True:
            info = self.hmp("info migrate")
            if re.search(r"[Mm]igration status: completed", info):
                break
            if re.search(r"[Mm]igration status: (failed|cancelled)", info) or time.monotonic() > deadline:
                raise HarnessError(f"{self.name}: saving the VM state failed: {info}")
            time.sleep(0.5)
        self.note(f"VM state saved to {path}")
        try:
            self.hmp("quit", timeout=10)
        except (HarnessError, OSError):
            pass  # QEMU closes the monitor as it quits
        self.process.wait(timeout=60)
        if self._reader:
            self._reader.join(timeout=5)

    def resume_shell(self, timeout: float = 120) -> None:
        """After a start from a saved state: the root shell (set up by
        wait_for_login before the save) answers, and the guest's clock, which
        stood still while the state was saved, is set to now."""
        # The first bytes typed into a just-resumed guest may be lost: an
        # empty line first, then short probes.
        self.send("\n")
        time.sleep(0.5)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.run("true", timeout=5)
                break
            except ExpectTimeout:
                if time.monotonic() > deadline:
                    raise
        self.run(f"date -u -s @{int(time.time())} > /dev/null")

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.note("QEMU stopped by the harness")
        self._release_serial()
        if self.monitor_path:
            self.monitor_path.unlink(missing_ok=True)

    def close(self) -> None:
        self.kill()
        if self._log:
            self._log.close()
            self._log = None

    def note(self, text: str) -> None:
        if self._log:
            self._log.write(f"\n===== harness: {text}\n".encode())

    # -- console -----------------------------------------------------------

    @property
    def output(self) -> str:
        with self._lock:
            return self._buffer

    def since(self, offset: int) -> str:
        with self._lock:
            return self._buffer[offset:]

    def time_at(self, offset: int) -> float:
        """Seconds since QEMU started at which buffer offset `offset` arrived."""
        with self._lock:
            when = self.started_at
            for arrived, start in self._chunks:
                if start > offset:
                    break
                when = arrived
        return when - self.started_at

    def elapsed(self) -> float:
        return time.monotonic() - self.started_at

    def send(self, text: str) -> None:
        if self._serial_in is None or not self.running():
            raise VMExited(f"{self.name}: not running")
        data = text.encode()
        while data:
            data = data[os.write(self._serial_in, data):]

    def expect(self, pattern: str | re.Pattern, timeout: float = BOOT_TIMEOUT,
               fail: str | re.Pattern | None = None) -> re.Match:
        """Wait until `pattern` appears after the cursor; move the cursor past it.

        `fail`: a pattern that, when seen first, aborts the wait."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        failure = re.compile(fail) if isinstance(fail, str) else fail
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                match = regex.search(self._buffer, self.cursor)
                bad = failure.search(self._buffer, self.cursor) if failure else None
                if bad and (not match or bad.start() < match.start()):
                    self.cursor = bad.end()
                    raise HarnessError(f"{self.name}: saw {bad.group(0)!r} while waiting for "
                                       f"{regex.pattern!r}\n{self._tail_locked()}")
                if match:
                    self.cursor = match.end()
                    return match
                if self._eof:
                    raise VMExited(f"{self.name}: QEMU exited while waiting for {regex.pattern!r} "
                                   f"({self._exit_report()})\n{self._tail_locked()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ExpectTimeout(f"{self.name}: {regex.pattern!r} not seen within {timeout:.0f} s\n"
                                        f"{self._tail_locked()}")
                self._lock.wait(min(left, 1.0))

    def _tail_locked(self, lines: int = 60) -> str:
        text = clean(self._buffer)
        tail = text.splitlines()[-lines:]
        return f"--- last {len(tail)} lines of the serial log ({self.log_path}) ---\n" + "\n".join(tail)

    def tail(self, lines: int = 60) -> str:
        with self._lock:
            return self._tail_locked(lines)

    # -- the autologin root shell ----------------------------------------

    def wait_for_login(self, timeout: float = BOOT_TIMEOUT) -> float:
        """Wait for the autologin and make the shell scriptable. Returns the
        seconds from QEMU start (or the last reboot request) to the login line."""
        match = self.expect(AUTOLOGIN, timeout=timeout)
        at = self.time_at(match.start())
        # Wait for the shell to answer; the first probe may be typed before
        # bash reads the terminal, so retry a few times (a PAM failure or a
        # panic ends the wait at once).
        # Typed input is echoed (and redrawn by readline): switch echo off, use
        # a plain prompt, keep kernel messages off the console, and make the
        # terminal wide so that tools (findmnt...) do not truncate columns.
        self.send("stty -echo cols 1000; export TERM=dumb PS1='# ' HISTFILE=/dev/null; dmesg -n 1\n")
        for attempt in range(10):
            try:
                self.run("true", timeout=15, fail=LOGIN_FAILURE)
                break
            except ExpectTimeout:
                if attempt == 9:
                    raise
        return at

    def run(self, command: str, timeout: float = COMMAND_TIMEOUT, check: bool = True,
            fail: str | re.Pattern | None = None) -> tuple[int, str] | str:
        """Run a shell command; returns its output (stdout+stderr, cleaned).

        check=True: raise unless it exits 0 and return the output;
        check=False: return (status, output)."""
        token = uuid.uuid4().hex[:12]
        # The markers are assembled by printf so that the typed (echoed)
        # command line can never match them.
        if "\n" in command:
            raise ValueError("one line per command")
        line = (f"printf 'RKB%sX\\n' {token}; {{ {command} ; }} 2>&1 </dev/null; "
                f"printf 'RKE%sX%d\\n' {token} $?\n")
        self.send(line)
        regex = re.compile(rf"RKB{token}X\r?\n(.*?)RKE{token}X(\d+)", re.S)
        match = self.expect(regex, timeout=timeout, fail=fail)
        status = int(match.group(2))
        output = clean(match.group(1))
        if check:
            if status != 0:
                raise HarnessError(f"{self.name}: `{command}` exited {status}:\n{output}\n{self.tail()}")
            return output
        return status, output

    # -- U-Boot's prompt (aarch64) ---------------------------------------

    def stop_uboot(self, timeout: float = 120) -> None:
        """Interrupt U-Boot's autoboot countdown and wait for its prompt."""
        self.expect(r"Hit any key to stop autoboot", timeout=timeout)
        self.send(" ")
        self.expect(r"=> $", timeout=30)

    def uboot(self, command: str, timeout: float = 60) -> tuple[int, str]:
        """Run a command at U-Boot's prompt: (status `$?`, output)."""
        token = uuid.uuid4().hex[:8]
        # `${rk_unset}` expands to nothing, so the echoed command line never matches.
        self.send(f"echo RKB${{rk_unset}}{token}; {command}; echo RKE${{rk_unset}}{token}:$?\n")
        match = self.expect(re.compile(rf"RKB{token}\r?\n(.*?)RKE{token}:(\d+)", re.S), timeout=timeout)
        self.expect(r"=> ", timeout=30)
        return int(match.group(2)), clean(match.group(1))

    def reboot(self, command: str = "systemctl reboot") -> None:
        """Ask the guest to reboot (does not wait for the next boot)."""
        self.note(f"reboot: {command}")
        self.send(f"{command}\n")

    def poweroff(self, timeout: float = 180) -> int:
        self.note("poweroff")
        self.send("systemctl poweroff\n")
        return self.wait_exit(timeout)


def read_osrel_version(uki: bytes) -> str | None:
    section = pe_section(uki, ".osrel")
    if section is None:
        return None
    text = uki[section[0]:section[0] + section[1]].decode(errors="replace")
    found = re.search(r"^IMAGE_VERSION=(.*)$", text, re.M)
    return found.group(1).strip().strip('"') if found else None


def pe_section(image: bytes, name: str) -> tuple[int, int] | None:
    """(file offset, size in file) of a PE section, by name."""
    if image[:2] != b"MZ":
        return None
    pe = int.from_bytes(image[0x3C:0x40], "little")
    if image[pe:pe + 4] != b"PE\0\0":
        return None
    coff = pe + 4
    count = int.from_bytes(image[coff + 2:coff + 4], "little")
    optional_size = int.from_bytes(image[coff + 16:coff + 18], "little")
    table = coff + 20 + optional_size
    for index in range(count):
        header = table + index * 40
        section_name = image[header:header + 8].rstrip(b"\0").decode(errors="replace")
        if section_name == name:
            virtual_size = int.from_bytes(image[header + 8:header + 12], "little")
            raw_size = int.from_bytes(image[header + 16:header + 20], "little")
            raw_offset = int.from_bytes(image[header + 20:header + 24], "little")
            return raw_offset, min(virtual_size, raw_size) if virtual_size else raw_size
    return None


def with_osrel_version(uki: bytes, old: str, new: str) -> bytes:
    """A copy of a UKI whose `.osrel` says version `new` instead of `old`
    (same length, so no section moves; the PE checksum is not checked by UEFI
    without Secure Boot)."""
    assert len(old) == len(new), "keep the length so no section moves"
    offset, size = pe_section(uki, ".osrel")
    osrel = uki[offset:offset + size]
    patched = osrel.replace(f"IMAGE_VERSION={old}".encode(), f"IMAGE_VERSION={new}".encode())
    patched = patched.replace(f"VERSION_ID={old}".encode(), f"VERSION_ID={new}".encode())
    assert patched != osrel, f".osrel has no IMAGE_VERSION={old}"
    return uki[:offset] + patched + uki[offset + size:]


def with_cmdline_replaced(uki: bytes, old: str, new: str) -> bytes:
    """A copy of a UKI whose `.cmdline` has `old` replaced by `new` (same length)."""
    assert len(old) == len(new), "keep the length so no section moves"
    offset, size = pe_section(uki, ".cmdline")
    cmdline = uki[offset:offset + size]
    assert old.encode() in cmdline, f".cmdline has no {old!r}"
    return uki[:offset] + cmdline.replace(old.encode(), new.encode()) + uki[offset + size:]


def uki_cmdline(uki: bytes) -> str:
    offset, size = pe_section(uki, ".cmdline")
    return uki[offset:offset + size].rstrip(b"\0").decode(errors="replace").strip()


# ---------------------------------------------------------------------------
# U-Boot binary environments (os-format/src/boot_state.rs)

UBOOT_ENV_SIZE = 4096


def encode_uboot_env(variables: dict[str, str], size: int = UBOOT_ENV_SIZE) -> bytes:
    """U-Boot's binary environment as `env export -c -s 0x1000` writes it:
    CRC32 (little-endian) of the data, then `key=value\\0` pairs in key order,
    an extra NUL, zeros up to `size`."""
    data = b"".join(f"{key}={value}".encode() + b"\0" for key, value in sorted(variables.items())) + b"\0"
    if len(data) > size - 4:
        raise ValueError(f"U-Boot environment too large: {variables}")
    data = data.ljust(size - 4, b"\0")
    return zlib.crc32(data).to_bytes(4, "little") + data


def decode_uboot_env(blob: bytes | None) -> dict[str, str] | None:
    """The variables of one state copy, or None where `env import -c` would
    refuse it (missing, wrong size, CRC mismatch, not key=value)."""
    if blob is None or len(blob) != UBOOT_ENV_SIZE:
        return None
    data = blob[4:]
    if zlib.crc32(data) != int.from_bytes(blob[:4], "little"):
        return None
    variables = {}
    while True:
        end = data.find(b"\0")
        if end < 0:
            return None
        if end == 0:
            return variables
        key, separator, value = data[:end].decode(errors="replace").partition("=")
        if not separator:
            return None
        variables[key] = value
        data = data[end + 1:]


# The boots the boot loaders give a committed slot in a row before they fall
# back (os_format::layout::COMMITTED_BOOT_TRIES).
COMMITTED_BOOT_TRIES = 3


def committed_uki_slot(name: str) -> str | None:
    """systemd-boot: the slot ("a", "b") whose committed UKI with boots left
    `name` is (racklet-a.efi, racklet-a+3.efi, +2-1, +1-2); None for a try, a
    used-up UKI or anything else."""
    found = re.fullmatch(r"racklet-([ab])(?:\+(\d)(?:-(\d))?)?\.efi", name)
    if found and (found.group(2) is None
                  or (int(found.group(2)) > 0
                      and int(found.group(2)) + int(found.group(3) or 0) == COMMITTED_BOOT_TRIES)):
        return found.group(1)
    return None


def hex_or_zero(text: str | None) -> int:
    """What U-Boot's itest/setexpr make of a hexadecimal variable."""
    try:
        return int(text or "0", 16)
    except ValueError:
        return 0


def uboot_newest(copies: list[dict[str, str] | None]) -> int | None:
    """Index of the decoded copy boot.cmd reads: the valid one with the higher
    racklet_seq, copy 1 on a tie (None: no valid copy)."""
    sequences = [hex_or_zero(copy.get("racklet_seq")) if copy is not None else 0 for copy in copies]
    if not any(sequences):
        return None
    return 1 if sequences[1] > sequences[0] else 0
