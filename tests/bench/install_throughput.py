#!/usr/bin/env python3
"""Benchmark driver for tests/bench/install-throughput.sh (not a test).

For each root size it makes a build whose root is SIZE MiB of compressible
data, with a real dm-verity tree (`veritysetup format`), zstd -3 like real
builds (image-builder build.rs ZSTD_LEVEL), publishes it with `racklet-image
publish` as version 2.0.0 for a node running 1.0.0, serves the repository
with `python3 -m http.server --bind 127.0.0.1`, then times, RUNS rounds, each
contender once per round:

  pipe:       zstd -dc root.erofs.zst | dd of=disk.img bs=1M seek=<root-b> conv=notrunc,fsync
  pipe bs=4M: the same with bs=4M iflag=fullblock (4 MiB writes, like the agent's pwrites)
  curl:       curl http://127.0.0.1:PORT/targets/... | zstd -dc | dd ... (the pipe plus HTTP)
  agent:      racklet-update daemon (private D-Bus) + `racklet-update --json apply --version 2.0.0`
  B:          the same with a second binary (--compare), e.g. a candidate fix

Every run writes into a fresh sparse GPT disk image file (the agent's
layout: root-a, verity-a, root-b, verity-b) in the work directory, at
root-b's offset, so the pipes write the same kind of file the agent does.
Before each run: sync, drop the page cache if permitted, then read the
artifact once so it comes from the page cache for every contender.

The agent's phases come from its log (stderr, time-stamped here as lines
arrive): "installing" -> root "artifact written and checked" (the write
phase that is compared with the pipe) -> verity written -> "slot verified"
-> "installed". The last lines give, per agent binary, the write phase and
the whole apply (apply call to "installed") as ratios to the pipe, each
beside its goal (issue 16: >= 0.9 and >= 0.5). Peak RSS is the daemon's VmHWM
after the apply (a fresh daemon per run). The daemon runs without
--fetcher-socket: it spawns `racklet-update fetcher` per download (HTTP and
zstd there, decompressed bytes to the daemon over a pipe); "fetch" is those
processes' CPU. With --perf the last round's daemon is perf-recorded
(CLOCK_MONOTONIC) and the root write window is summarised per thread.

Usage: install_throughput.py --update BIN --image BIN --work DIR [--data usr|erofs]
           [--runs N] [--uki-mib N] [--perf] [--compare BIN] [--keep]
           [--no-drop-caches] SIZE_MIB...
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

MIB = 1 << 20
VARIANT = "qemu-x86_64"
OLD_VERSION = "1.0.0"
NEW_VERSION = "2.0.0"
# zstd level of real builds (image-builder/src/build.rs ZSTD_LEVEL).
ZSTD_LEVEL = 3
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ROOT_TYPE = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
VERITY_TYPE = "2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5"
VAR_TYPE = "4D21B016-B534-45C2-A9FB-5C16E091FD2D"
LOADER_CONF = "timeout 0\neditor no\nauto-entries no\nauto-firmware no\nconsole-mode keep\n"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(argv, **kwargs):
    result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result


def bash(script, **kwargs):
    return run(["bash", "-c", "set -euo pipefail\n" + script], **kwargs)


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while True:
            block = source.read(4 * MIB)
            if not block:
                return digest.hexdigest()
            digest.update(block)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the machine ------------------------------------------------------------------


def load_average():
    with open("/proc/loadavg") as source:
        return " ".join(source.read().split()[:3])


def can_drop_caches():
    try:
        with open("/proc/sys/vm/drop_caches", "w") as out:
            out.write("1\n")
        return True
    except OSError:
        return False


def settle(artifact, drop):
    """Flush dirty pages (so earlier writes do not slow the next contender),
    drop the page cache if allowed, and read the artifact once so every
    contender reads it from memory."""
    os.sync()
    if drop:
        with open("/proc/sys/vm/drop_caches", "w") as out:
            out.write("3\n")
    with open(artifact, "rb") as source:
        while source.read(4 * MIB):
            pass
    time.sleep(0.5)


def proc_status(pid):
    values = {}
    with open(f"/proc/{pid}/status") as source:
        for line in source:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                values[key] = int(value.split()[0]) * 1024
    return values


def cpu_seconds(pid, children=False):
    """User + system CPU seconds of a process (all its threads), or with
    children=True of its children that ended and were waited for (the
    daemon's fetcher processes)."""
    with open(f"/proc/{pid}/stat") as source:
        fields = source.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    first = 13 if children else 11
    return (int(fields[first]) + int(fields[first + 1])) / ticks


# --- the build and the repository ------------------------------------------------------


def source_chunks(kind):
    """Endless 1 MiB-ish chunks of root data of the chosen kind."""
    if kind == "usr":
        # A tar stream of /usr: program, library and data files as they are
        # (zstd -3 makes about 2.4x of it here).
        argv = ["tar", "-cf", "-", "--ignore-failed-read", "--warning=none", "-C", "/", "usr"]
    else:
        # The real image's root (erofs, LZ4HC inside; zstd -3 makes ~1.5x of it),
        # repeated as often as needed.
        candidates = [os.path.join(TOP, "build", variant, "update", "root.erofs.zst")
                      for variant in ("qemu-x86_64", "qemu-aarch64", "rpi4")]
        found = [path for path in candidates if os.path.isfile(path)]
        if not found:
            raise RuntimeError("--data erofs needs a build: none of " + ", ".join(candidates))
        argv = ["zstd", "-q", "-dc", found[0]]
    while True:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            while True:
                chunk = process.stdout.read(MIB)
                if not chunk:
                    break
                yield chunk
        finally:
            process.kill()
            process.wait()


def make_root(path, size, kind):
    written = 0
    with open(path, "wb") as out:
        for chunk in source_chunks(kind):
            chunk = chunk[: size - written]
            out.write(chunk)
            written += len(chunk)
            if written == size:
                break


def verity_format(root_path, hash_path, salt):
    result = run([
        "veritysetup", "format", "--hash=sha256", "--data-block-size=4096",
        "--hash-block-size=4096", "--format=1", f"--salt={salt}",
        "--uuid=00000000-0000-4000-8000-000000000001", root_path, hash_path,
    ])
    match = re.search(r"Root hash:\s*([0-9a-f]{64})", result.stdout)
    if not match:
        raise RuntimeError(f"veritysetup format printed no root hash:\n{result.stdout}")
    return match.group(1)


def make_build(directory, size, kind, uki_bytes):
    """Writes <directory>/manifest.json and <directory>/update/*; returns facts."""
    raw = os.path.join(directory, "raw")
    update = os.path.join(directory, "update")
    os.makedirs(raw)
    os.makedirs(update)
    root_img = os.path.join(raw, "root.img")
    verity_img = os.path.join(raw, "verity.img")
    started = time.monotonic()
    make_root(root_img, size, kind)
    salt = os.urandom(32).hex()
    root_hash = verity_format(root_img, verity_img, salt)
    files = []
    for name, source, kind_entry in (
        ("root.erofs.zst", root_img, {"kind": "root-filesystem"}),
        ("verity.img.zst", verity_img, {"kind": "verity-hash-tree"}),
    ):
        shipped = os.path.join(update, name)
        run(["zstd", "-q", f"-{ZSTD_LEVEL}", "-T0", "-f", source, "-o", shipped])
        files.append((name, kind_entry, "zstd", shipped, source))
    for slot in ("a", "b"):
        path = os.path.join(update, f"uki-{slot}.efi")
        with open(path, "wb") as out:
            out.write(b"MZ racklet bench uki " + slot.encode() + b" ")
            out.write(os.urandom(uki_bytes))
        files.append((f"uki-{slot}.efi", {"kind": "kernel-image", "slot": slot}, "none", path, path))
    artifacts = []
    for name, kind_entry, compression, shipped, uncompressed in files:
        entry = {"name": name, **kind_entry, "compression": compression,
                 "size": os.path.getsize(shipped), "sha256": sha256_file(shipped),
                 "uncompressed_size": os.path.getsize(uncompressed),
                 "uncompressed_sha256": sha256_file(uncompressed)}
        artifacts.append(entry)
    verity_bytes = os.path.getsize(verity_img)
    manifest = {
        "schema": 1, "image_name": "racklet-os", "variant": VARIANT, "arch": "x86_64",
        "version": NEW_VERSION, "source_date_epoch": 1700000000,
        "kernel_version": "6.1.0-28-cloud-amd64", "kernel_cmdline": "ro racklet.slot=a",
        "verity": {"root_hash": root_hash, "salt": salt, "hash_algorithm": "sha256",
                   "data_block_size": 4096, "hash_block_size": 4096,
                   "data_blocks": size // 4096},
        "k3s": {"kind": "absent"},
        "partitions": {"esp": 8 * MIB, "root": size, "verity": verity_bytes, "data": 4 * MIB},
        "required_units": [], "artifacts": artifacts, "outputs": [], "packages": [],
    }
    with open(os.path.join(directory, "manifest.json"), "w") as out:
        json.dump(manifest, out, indent=2)
    shutil.rmtree(raw)  # the slot's bytes are checked by the agent itself
    return {
        "root_hash": root_hash,
        "root_bytes": size,
        "verity_bytes": verity_bytes,
        "root_zst_bytes": artifacts[0]["size"],
        "setup_seconds": time.monotonic() - started,
    }


def publish(image, build_dir, repo, keys):
    run([image, "publish", "--build", build_dir, "--repo", repo, "--keys", keys])
    shutil.rmtree(os.path.join(build_dir, "update"))  # the repository holds a copy


def target_file(repo, artifact):
    folder = os.path.join(repo, "targets")
    suffix = f".{VARIANT}-{NEW_VERSION}-{artifact}"
    names = [name for name in os.listdir(folder) if name.endswith(suffix)]
    if len(names) != 1:
        raise RuntimeError(f"expected one target *{suffix} in {folder}, found {names}")
    return os.path.join(folder, names[0])


# --- a node: disk, ESP, boot files, config ------------------------------------------


def make_disk(path, root_part_mib, verity_part_mib):
    """A sparse GPT disk image like the agent's (slot A's contents are not needed)."""
    size_mib = 1 + 8 + 2 * (root_part_mib + verity_part_mib) + 4 + 1
    with open(path, "wb") as out:
        out.truncate(size_mib * MIB)
    run([
        "sgdisk", "-o",
        "-n", "1:0:+8M", "-t", f"1:{ESP_TYPE}", "-c", "1:esp",
        "-n", f"2:0:+{root_part_mib}M", "-t", f"2:{ROOT_TYPE}", "-c", "2:root-a",
        "-n", f"3:0:+{verity_part_mib}M", "-t", f"3:{VERITY_TYPE}", "-c", "3:verity-a",
        "-n", f"4:0:+{root_part_mib}M", "-t", f"4:{ROOT_TYPE}", "-c", "4:root-b",
        "-n", f"5:0:+{verity_part_mib}M", "-t", f"5:{VERITY_TYPE}", "-c", "5:verity-b",
        "-n", "6:0:0", "-t", f"6:{VAR_TYPE}", "-c", "6:data",
        path,
    ])
    table = json.loads(run(["sfdisk", "--json", path]).stdout)["partitiontable"]
    sector = table.get("sectorsize", 512)
    return {part["name"]: part["start"] * sector for part in table["partitions"]}


class Node:
    def __init__(self, directory, facts, port, repo):
        self.dir = directory
        os.makedirs(directory)
        self.disk = os.path.join(directory, "disk.img")
        root_part_mib = facts["root_bytes"] // MIB + 4
        verity_part_mib = -(-facts["verity_bytes"] // MIB) + 1
        self.offsets = make_disk(self.disk, root_part_mib, verity_part_mib)
        self.esp = os.path.join(directory, "esp")
        for sub in ("loader", "EFI/systemd", "EFI/Linux"):
            os.makedirs(os.path.join(self.esp, sub))
        with open(os.path.join(self.esp, "loader", "loader.conf"), "w") as out:
            out.write(LOADER_CONF)
        with open(os.path.join(self.esp, "EFI", "systemd", "systemd-bootx64.efi"), "wb") as out:
            out.write(b"MZ dummy systemd-boot\n")
        with open(os.path.join(self.esp, "EFI", "Linux", "racklet-a.efi"), "wb") as out:
            out.write(b"MZ racklet uki a " + OLD_VERSION.encode() + b"\n")
        self.state_dir = os.path.join(directory, "state")
        self.cmdline = os.path.join(directory, "cmdline")
        self.os_release = os.path.join(directory, "os-release")
        self.config = os.path.join(directory, "update.toml")
        self.checks = os.path.join(directory, "health.d")
        os.makedirs(self.checks)
        old_hash = "ab" * 32  # slot A's (version 1.0.0) root hash; its bytes are never read
        with open(self.cmdline, "w") as out:
            out.write(f"BOOT_IMAGE=/vmlinuz console=ttyS0 ro quiet racklet.slot=a racklet.roothash={old_hash}\n")
        with open(self.os_release, "w") as out:
            out.write('NAME="Racklet OS"\nID=racklet\nIMAGE_ID=racklet-os\n'
                      f"IMAGE_VERSION={OLD_VERSION}\nVARIANT_ID={VARIANT}\nARCHITECTURE=x86_64\n")
        past = time.time() - 30 * 86400
        os.utime(self.os_release, (past, past))
        base = f"http://127.0.0.1:{port}"
        with open(self.config, "w") as out:
            out.write(
                f'metadata_url = "{base}/metadata/"\ntargets_url = "{base}/targets/"\n'
                "check_interval_seconds = 3600\ncheck_jitter_seconds = 0\n"
                "auto_apply = false\nauto_reboot = false\nhttp_timeout_seconds = 3600\n\n"
                "[health]\ntimeout_seconds = 20\nrequired_units = []\n"
                f'checks_dir = "{self.checks}"\nk3s_node_ready = false\n'
            )
        self.repo = repo

    def daemon_argv(self, update):
        return [
            update, "daemon", "--esp", self.esp, "--disk", self.disk,
            "--state-dir", self.state_dir, "--tuf-datastore", os.path.join(self.state_dir, "tuf"),
            "--tuf-root", os.path.join(self.repo, "metadata", "1.root.json"),
            "--cmdline", self.cmdline, "--os-release", self.os_release,
            "--config", self.config, "--config-defaults", os.path.join(self.dir, "defaults.toml"),
            "--reboot-marker", os.path.join(self.dir, "reboot-marker"),
            "--no-time-sync", "--no-timer",
        ]

    def remove(self):
        shutil.rmtree(self.dir, ignore_errors=True)


# --- the contenders ----------------------------------------------------------------


def timed_pipe(script):
    started = time.monotonic()
    result = bash(script)
    return time.monotonic() - started, result


def baseline_pipe(node, artifact, dd_options="bs=1M"):
    offset = node.offsets["root-b"]
    seconds, result = timed_pipe(
        f"/usr/bin/time -f '%M' -o {node.dir}/zstd.rss zstd -q -dc '{artifact}' | "
        f"dd of='{node.disk}' {dd_options} oflag=seek_bytes seek={offset} conv=notrunc,fsync status=none")
    with open(os.path.join(node.dir, "zstd.rss")) as source:
        rss = int(source.read().split()[-1]) * 1024
    return {"seconds": seconds, "zstd_rss": rss}


def baseline_curl(node, url):
    offset = node.offsets["root-b"]
    seconds, _ = timed_pipe(
        f"curl -sS --fail '{url}' | zstd -q -dc | "
        f"dd of='{node.disk}' bs=1M oflag=seek_bytes seek={offset} conv=notrunc,fsync status=none")
    return {"seconds": seconds}


class StampedLog:
    """Reads a process's stderr, keeping (monotonic time, line) for each line."""

    def __init__(self, stream, path):
        self.lines = []
        self.path = path
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream):
        with open(self.path, "w") as out:
            for raw in stream:
                now = time.monotonic()
                line = ANSI.sub("", raw.decode(errors="replace")).rstrip("\n")
                self.lines.append((now, line))
                out.write(f"{now:.3f} {line}\n")
                out.flush()

    def first(self, *needles):
        for stamp, line in self.lines:
            if all(needle in line for needle in needles):
                return stamp
        return None


def agent_run(node, update, bus_address, artifact, drop, perf_path=None):
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=bus_address,
               RACKLET_LOG=os.environ.get("RACKLET_BENCH_LOG", "info"))
    cli_env = dict(env, RACKLET_LOG="warn")
    daemon = subprocess.Popen(node.daemon_argv(update), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env=env)
    stamped = StampedLog(daemon.stderr, os.path.join(node.dir, "daemon.log"))
    perf = None
    try:
        deadline = time.monotonic() + 30
        while True:
            if daemon.poll() is not None:
                time.sleep(0.2)
                raise RuntimeError(f"the daemon exited {daemon.returncode}:\n" +
                                   "\n".join(line for _, line in stamped.lines[-20:]))
            status = subprocess.run([update, "--json", "status"], env=cli_env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            if status.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the daemon did not answer on D-Bus within 30 s")
            time.sleep(0.1)
        settle(artifact, drop)
        idle = proc_status(daemon.pid)
        if perf_path:
            perf = subprocess.Popen(["perf", "record", "-q", "-k", "CLOCK_MONOTONIC",
                                     "-F", str(PERF_FREQUENCY), "-p",
                                     str(daemon.pid), "-o", perf_path],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
        cpu_before = cpu_seconds(daemon.pid)
        children_before = cpu_seconds(daemon.pid, children=True)
        started = time.monotonic()
        apply = subprocess.run([update, "--json", "apply", "--version", NEW_VERSION], env=cli_env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               timeout=3600)
        returned = time.monotonic()
        cpu_after = cpu_seconds(daemon.pid)
        children_after = cpu_seconds(daemon.pid, children=True)
        memory = proc_status(daemon.pid)
        if perf:
            perf.send_signal(signal.SIGINT)
            perf.wait(60)
            perf = None
        if apply.returncode != 0:
            raise RuntimeError(f"racklet-update apply exited {apply.returncode}: {apply.stdout}{apply.stderr}\n" +
                               "\n".join(line for _, line in stamped.lines[-20:]))
    finally:
        if perf:
            perf.kill()
            perf.wait()
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        stamped.thread.join(5)
    marks = {
        "installing": stamped.first("installing"),
        "root": stamped.first("artifact written and checked", "root.erofs.zst"),
        "verity": stamped.first("artifact written and checked", "verity.img.zst"),
        "verified": stamped.first("slot verified"),
        "installed": stamped.first("installed; the next boot"),
    }
    missing = [name for name, stamp in marks.items() if stamp is None]
    if missing:
        raise RuntimeError(f"the daemon log lacks {missing}; see {stamped.path}")
    # Logged since 2918f8f only (a compared older agent has none).
    uki_done = stamped.first("kernel image downloaded and checked")
    return {
        "decide": marks["installing"] - started,
        "root_write": marks["root"] - marks["installing"],
        "verity_write": marks["verity"] - marks["root"],
        "verify": marks["verified"] - marks["verity"],
        "uki": uki_done - marks["verity"] if uki_done is not None else None,
        "finish": marks["installed"] - marks["verified"],
        "total": marks["installed"] - started,
        "cli_total": returned - started,
        "write": marks["verity"] - marks["installing"],
        "vm_hwm": memory["VmHWM"],
        "vm_rss_idle": idle["VmRSS"],
        "cpu": cpu_after - cpu_before,
        "fetcher_cpu": children_after - children_before,
        "write_window": (marks["installing"], marks["root"]),
    }


# --- the benchmark -------------------------------------------------------------------


def median(values):
    return statistics.median(values)


PERF_FREQUENCY = 997
# Issue 16, item 3: the write phase and the whole apply as a ratio to the pipe.
WRITE_GOAL = 0.9
TOTAL_GOAL = 0.5


def perf_summary(perf_path, window, out_path):
    """Flat profiles of the root write phase only (`window`: monotonic start and
    end seconds; perf records with CLOCK_MONOTONIC). No call graphs: the
    release binary has no frame pointers. CPU seconds = samples / frequency."""
    sections = []
    for title, sort in (("CPU s by thread (tid:name)", "pid"), ("CPU s by thread and symbol", "pid,sym")):
        report = subprocess.run(
            ["perf", "report", "-i", perf_path, "--stdio", "--no-children", "-n", "--sort", sort,
             "--time", f"{window[0]:.6f},{window[1]:.6f}", "--percent-limit", "2"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        lines = []
        for line in report.stdout.splitlines():
            fields = line.split()
            if not line.strip() or line.startswith("#") or len(fields) < 3 or not fields[1].isdigit():
                continue
            seconds = int(fields[1]) / PERF_FREQUENCY
            lines.append(f"{seconds:6.2f} s  {fields[0]:>7}  {' '.join(fields[2:])}")
        sections.append((title, lines[:12]))
    with open(out_path, "w") as out:
        for title, lines in sections:
            out.write(f"--- {title}\n" + "\n".join(lines) + "\n")
    return sections


def bench_size(args, size_mib, keys, bus_address, drop, agents):
    size = size_mib * MIB
    work = os.path.join(args.work, f"size-{size_mib}")
    os.makedirs(work)
    log(f"{size_mib} MiB: making the build ({args.data} data, zstd -{ZSTD_LEVEL}, veritysetup format)")
    build_dir = os.path.join(work, "build")
    facts = make_build(build_dir, size, args.data, args.uki_mib * MIB)
    repo = os.path.join(work, "repo")
    publish(args.image, build_dir, repo, keys)
    artifact = target_file(repo, "root.erofs.zst")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", repo],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/targets/{os.path.basename(artifact)}"
    results = {"pipe": [], "pipe4m": [], "curl": [], "agents": {label: [] for label, _ in agents},
               "perf": {}, "loads": []}
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(["curl", "-sf", "-o", "/dev/null",
                              f"http://127.0.0.1:{port}/metadata/1.root.json"]).returncode:
            if time.monotonic() > deadline:
                raise RuntimeError("python3 -m http.server did not start")
            time.sleep(0.1)
        for index in range(args.runs):
            results["loads"].append(load_average())
            for key, contender in (
                ("pipe", lambda node: baseline_pipe(node, artifact)),
                ("pipe4m", lambda node: baseline_pipe(node, artifact, "bs=4M iflag=fullblock")),
                ("curl", lambda node: baseline_curl(node, url)),
            ):
                node = Node(os.path.join(work, f"{key}-{index}"), facts, port, repo)
                settle(artifact, drop)
                results[key].append(contender(node))
                node.remove()
            line = []
            for number, (label, binary) in enumerate(agents):
                node = Node(os.path.join(work, f"agent{number}-{index}"), facts, port, repo)
                perf_path = None
                if args.perf and index == args.runs - 1:
                    perf_path = os.path.join(args.work, f"perf-{size_mib}-{number}.data")
                server_cpu = cpu_seconds(server.pid)
                result = agent_run(node, binary, bus_address, artifact, drop, perf_path)
                result["server_cpu"] = cpu_seconds(server.pid) - server_cpu
                results["agents"][label].append(result)
                shutil.copyfile(os.path.join(node.dir, "daemon.log"),
                                os.path.join(args.work, f"daemon-{size_mib}-{number}-{index}.log"))
                node.remove()
                line.append(f"{label} root write {result['root_write']:.2f} s, total {result['total']:.2f} s, "
                            f"VmHWM {result['vm_hwm'] / MIB:.1f} MiB")
                if perf_path:
                    results["perf"][label] = perf_summary(
                        perf_path, result["write_window"],
                        os.path.join(args.work, f"perf-{size_mib}-{number}.txt"))
                    if not args.keep:
                        os.unlink(perf_path)
            log(f"{size_mib} MiB run {index + 1}/{args.runs} (load {results['loads'][-1]}): "
                f"pipe {results['pipe'][-1]['seconds']:.2f} s, pipe bs=4M {results['pipe4m'][-1]['seconds']:.2f} s, "
                f"curl {results['curl'][-1]['seconds']:.2f} s; " + "; ".join(line))
    finally:
        server.terminate()
        server.wait()
        if not args.keep:
            shutil.rmtree(repo, ignore_errors=True)
    return facts, results


def report(args, rows, agents, drop, load_start, load_end):
    def rate(nbytes, seconds):
        return nbytes / seconds / 1e6

    def m(values):
        return statistics.median(values)

    print()
    print(f"machine: {os.cpu_count()} CPUs; load average {load_start} at start, {load_end} at end; page cache "
          f"{'dropped' if drop else 'NOT dropped (sync only)'} before each run, then the "
          f"artifact read once")
    print(f"data: {args.data} ({'a tar stream of /usr' if args.data == 'usr' else 'the real root.erofs, repeated'}), "
          f"zstd -{ZSTD_LEVEL} -T0 (real builds use level {ZSTD_LEVEL}); UKI {args.uki_mib} MiB; "
          f"median of {args.runs} run(s); MB = 10^6 bytes")
    for label, binary in agents:
        print(f"{label}: {binary}")
    print()
    print("pipe        = zstd -dc root.zst | dd of=disk.img bs=1M seek=<root-b> conv=notrunc,fsync "
          "(dd writes what a pipe read returns: 64 KiB)")
    print("write       = the agent's root write: 'installing' to the root's 'artifact written and checked' "
          "(relabel; the fetcher process: download, sha256 of the shipped bytes, zstd; frames over a pipe; "
          "the daemon: the root's dm-verity tree as it streams, O_DIRECT writes with a CRC-32 per MiB, fdatasync)")
    print("total       = apply call to 'installed' (adds TUF metadata, verity write, the read-back of both partitions "
          "with the UKI download beside it, relabel, boot entry)")
    print()
    print(f"{'root MiB':>8} {'bytes':>11} {'zst MiB':>8} {'agent':>8} {'pipe s':>7} {'MB/s':>6} "
          f"{'write s':>8} {'MB/s':>6} {'total s':>8} {'MB/s':>6} {'write/pipe':>10} {'total/pipe':>10} "
          f"{'VmHWM':>9}")
    summary = {label: [] for label, _ in agents}
    for size_mib, facts, results in rows:
        nbytes = facts["root_bytes"]
        pipe = m([r["seconds"] for r in results["pipe"]])
        for label, _ in agents:
            runs = results["agents"][label]
            write = m([r["root_write"] for r in runs])
            total = m([r["total"] for r in runs])
            hwm = max(r["vm_hwm"] for r in runs)
            summary[label].append((size_mib, pipe / write, pipe / total, hwm))
            print(f"{size_mib:>8} {nbytes:>11} {facts['root_zst_bytes'] / MIB:>8.1f} {label:>8} "
                  f"{pipe:>7.2f} {rate(nbytes, pipe):>6.0f} {write:>8.2f} {rate(nbytes, write):>6.0f} "
                  f"{total:>8.2f} {rate(nbytes, total):>6.0f} {pipe / write:>10.2f} {pipe / total:>10.2f} "
                  f"{hwm / MIB:>5.1f} MiB")
    print()
    print("controls (median s, MB/s, and the agent's write phase as a ratio to each):")
    print("  curl pipe  = curl http://127.0.0.1:PORT/targets/... | zstd -dc | dd ... (the pipe plus HTTP)")
    print("  pipe bs=4M = dd bs=4M iflag=fullblock: 4 MiB writes at the agent's offsets, like its pwrites")
    print(f"{'root MiB':>8} {'curl pipe':>15} {'pipe bs=4M':>15}   " +
          "  ".join(f"{label + ' write/curl':>17} {label + ' write/4M':>15}" for label, _ in agents))
    for size_mib, facts, results in rows:
        nbytes = facts["root_bytes"]
        curl = m([r["seconds"] for r in results["curl"]])
        pipe4m = m([r["seconds"] for r in results["pipe4m"]])
        ratios = []
        for label, _ in agents:
            write = m([r["root_write"] for r in results["agents"][label]])
            ratios.append(f"{curl / write:>17.2f} {pipe4m / write:>15.2f}")
        print(f"{size_mib:>8} {curl:>7.2f} {rate(nbytes, curl):>7.0f} {pipe4m:>7.2f} {rate(nbytes, pipe4m):>7.0f}   "
              + "  ".join(ratios))
    print()
    print("agent phases (median s): decide = apply call to 'installing' (TUF metadata, manifest, policy); "
          "verify = the read-back (the UKI downloads meanwhile); uki = the UKI's download, from the same start; finish = relabel, boot entry; cpu = daemon CPU s (user+sys, all threads) during the "
          "apply; fetch = its fetcher processes' CPU s; server = http.server CPU s; idle = daemon RSS before "
          "the apply")
    print(f"{'root MiB':>8} {'agent':>8} {'decide':>7} {'root':>7} {'verity':>7} {'verify':>7} {'uki':>7} {'finish':>7} "
          f"{'total':>7} {'cpu':>7} {'fetch':>7} {'server':>7} {'idle RSS':>9} {'zstd -dc RSS':>13}")
    for size_mib, facts, results in rows:
        zstd_rss = max(r["zstd_rss"] for r in results["pipe"])
        for label, _ in agents:
            runs = results["agents"][label]

            def mk(key):
                return m([r[key] for r in runs])

            ukis = [r["uki"] for r in runs if r.get("uki") is not None]
            uki = f"{m(ukis):>7.2f}" if ukis else f"{'-':>7}"

            print(f"{size_mib:>8} {label:>8} {mk('decide'):>7.2f} {mk('root_write'):>7.2f} "
                  f"{mk('verity_write'):>7.2f} {mk('verify'):>7.2f} {uki} {mk('finish'):>7.2f} {mk('total'):>7.2f} "
                  f"{mk('cpu'):>7.2f} {mk('fetcher_cpu'):>7.2f} {mk('server_cpu'):>7.2f} "
                  f"{mk('vm_rss_idle') / MIB:>6.1f}MiB "
                  f"{zstd_rss / MIB:>10.1f}MiB")
    for size_mib, facts, results in rows:
        for label, sections in results["perf"].items():
            print()
            print(f"perf: {label}'s root write phase, last run at {size_mib} MiB "
                  f"(CPU s = samples / {PERF_FREQUENCY} Hz):")
            for title, lines in sections:
                print(f"  --- {title}")
                for line in lines:
                    print("  " + line)
    print()
    # The acceptance of issue 16 (item 3): one line per ratio, the worst size, the goal beside it.
    for label, items in summary.items():
        write_worst = min(items, key=lambda item: item[1])
        total_worst = min(items, key=lambda item: item[2])
        rss = ", ".join(f"{hwm / MIB:.0f} MiB at {size_mib} MiB" for size_mib, _, _, hwm in items)
        prefix = "" if label == "agent" else f"{label}: "
        print(f"{prefix}write phase: ratio {write_worst[1]:.2f} at {write_worst[0]} MiB "
              f"(root write vs zstd -dc | dd; goal >= {WRITE_GOAL}), peak RSS {rss}")
        print(f"{prefix}whole apply: ratio {total_worst[2]:.2f} at {total_worst[0]} MiB "
              f"(apply call to 'installed' vs zstd -dc | dd; goal >= {TOTAL_GOAL})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--update", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--data", choices=("usr", "erofs"), default="usr")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--uki-mib", type=int, default=32)
    parser.add_argument("--perf", action="store_true")
    parser.add_argument("--compare", metavar="BIN", help="a second racklet-update, run after the first each time")
    parser.add_argument("--keep", action="store_true", help="keep perf data and repositories")
    parser.add_argument("--no-drop-caches", action="store_true", help="only sync before each run")
    parser.add_argument("sizes", nargs="+", type=int, metavar="SIZE_MIB")
    args = parser.parse_args()
    agents = [("agent", args.update)] + ([("B", args.compare)] if args.compare else [])

    drop = not args.no_drop_caches and can_drop_caches()
    load_start = load_average()
    keys = os.path.join(args.work, "keys")
    run([args.image, "keys", "generate", "--dir", keys])
    bus_dir = os.path.join(args.work, "bus")
    os.makedirs(bus_dir)
    bus_conf = os.path.join(bus_dir, "bus.conf")
    with open(bus_conf, "w") as out:
        out.write(
            "<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN\"\n"
            " \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">\n"
            "<busconfig><type>session</type>"
            f"<listen>unix:path={bus_dir}/socket</listen><auth>EXTERNAL</auth>"
            "<policy context=\"default\"><allow send_destination=\"*\" eavesdrop=\"true\"/>"
            "<allow eavesdrop=\"true\"/><allow own=\"*\"/></policy></busconfig>\n")
    bus = subprocess.Popen(["dbus-daemon", f"--config-file={bus_conf}", "--nofork", "--print-address=1"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    rows = []
    try:
        bus_address = bus.stdout.readline().strip()
        if not bus_address:
            raise RuntimeError("dbus-daemon printed no address")
        for size_mib in args.sizes:
            facts, results = bench_size(args, size_mib, keys, bus_address, drop, agents)
            rows.append((size_mib, facts, results))
            with open(os.path.join(args.work, "results.json"), "w") as out:
                json.dump([{"size_mib": s, "facts": f, "results": r} for s, f, r in rows], out, indent=2)
    finally:
        bus.terminate()
        bus.wait()
    report(args, rows, agents, drop, load_start, load_average())


if __name__ == "__main__":
    main()
