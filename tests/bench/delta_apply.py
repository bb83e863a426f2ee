#!/usr/bin/env python3
"""The node's apply time in tests/bench/delta.sh: a delta against a full install.

For each change (agent, package, kernel) of delta.sh's work directory, a node
whose slot A holds the base build (1.0.0: its root and verity tree written
into a sparse GPT disk image file with the PARTUUIDs the image builder derives
from the root hash, its UKI as the ESP's racklet-a.efi, the kernel command line
naming the root hash) runs `racklet-update daemon` on a private D-Bus, and
`racklet-update --json apply --version 2.0.0` is timed (the call returns once
the slot is written and verified) against two repositories served on
127.0.0.1: one with the delta (the agent should take it) and one without (a
full download). With --link-mbit each HTTP response is paced at that rate, as
over a link of that speed (one download at a time). `status --json` must then name the path taken. RUNS rounds,
each path once per round, with the page cache flushed (and dropped when
permitted) before each run; medians are reported.

Prints JSON on stdout: {NAME: {"delta_seconds", "full_seconds",
"delta_path", "runs"}}, or {NAME: {"error": ...}} when it could not be
measured (e.g. the agent took the full download from the repository with the
delta: the reason it gives is kept).

Usage: delta_apply.py --work DIR --variant NAME --update BIN [--runs N] [--link-mbit R]
"""

import argparse
import functools
import http.server
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import install_throughput  # noqa: E402
from install_throughput import MIB, StampedLog, can_drop_caches, run  # noqa: E402

CHANGES = ["agent", "package", "kernel"]
OLD_VERSION = "1.0.0"
NEW_VERSION = "2.0.0"


def log(message):
    print(f"delta_apply: {message}", file=sys.stderr, flush=True)


def guid_text(hex32):
    h = hex32.lower()
    return f"{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


class Node(install_throughput.Node):
    """install-throughput's node (its disk layout, ESP, configuration and
    daemon arguments), running the base build from slot A: its root and
    verity tree written into slot A, the PARTUUIDs the image builder derives
    from the root hash, its UKI as racklet-a.efi, the command line naming the
    root hash. Slot B is sized for `result_root_bytes`."""

    def __init__(self, directory, base_dir, port, repo, result_root_bytes):
        with open(os.path.join(base_dir, "manifest.json")) as source:
            manifest = json.load(source)
        artifacts = {(a["kind"], a.get("slot")): a for a in manifest["artifacts"]}
        root_artifact = artifacts[("root-filesystem", None)]
        verity_artifact = artifacts[("verity-hash-tree", None)]
        super().__init__(directory, {
            "root_bytes": max(root_artifact["uncompressed_size"], result_root_bytes),
            "verity_bytes": 2 * verity_artifact["uncompressed_size"],
        }, port, repo)
        root_hash = manifest["verity"]["root_hash"]
        run(["sgdisk", "-u", f"2:{guid_text(root_hash[:32])}", "-u", f"3:{guid_text(root_hash[32:])}",
             self.disk])
        with open(self.disk, "r+b") as disk:
            for name, artifact in (("root-a", root_artifact), ("verity-a", verity_artifact)):
                disk.seek(self.offsets[name])
                with open(os.path.join(base_dir, "update", artifact["name"]), "rb") as shipped:
                    decompress = subprocess.Popen(["zstd", "-d", "-q", "-c"], stdin=shipped,
                                                  stdout=subprocess.PIPE)
                    shutil.copyfileobj(decompress.stdout, disk, 4 * MIB)
                    if decompress.wait() != 0:
                        raise RuntimeError(f"zstd -d {artifact['name']} failed")
        uki = artifacts[("kernel-image", "a")]
        with open(os.path.join(base_dir, "update", uki["name"]), "rb") as shipped, \
                open(os.path.join(self.esp, "EFI", "Linux", "racklet-a.efi"), "wb") as out:
            if uki["compression"] == "zstd":
                run_into = subprocess.run(["zstd", "-d", "-q", "-c"], stdin=shipped, stdout=out)
                if run_into.returncode != 0:
                    raise RuntimeError(f"zstd -d {uki['name']} failed")
            else:
                shutil.copyfileobj(shipped, out)
        with open(self.cmdline, "w") as out:
            out.write(f"BOOT_IMAGE=/vmlinuz console=ttyS0 ro quiet racklet.slot=a racklet.roothash={root_hash}\n")


class PacedHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files, each response paced at `bytes_per_second` (0: as fast as it goes)."""

    bytes_per_second = 0

    def log_message(self, *args):
        pass

    def copyfile(self, source, outputfile):
        if not self.bytes_per_second:
            return super().copyfile(source, outputfile)
        started = time.monotonic()
        sent = 0
        while chunk := source.read(64 * 1024):
            outputfile.write(chunk)
            sent += len(chunk)
            ahead = sent / self.bytes_per_second - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
        return None


def serve(directory, link_mbit):
    """An HTTP server for `directory` on 127.0.0.1 (a thread of this process)."""
    handler = type("Handler", (PacedHandler,), {"bytes_per_second": link_mbit * 1e6 / 8})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=directory))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def apply_once(node, update, bus_address, drop):
    """Time `racklet-update apply` on a fresh daemon (from the call to the
    daemon's "installed" line); the path from status."""
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=bus_address, RACKLET_LOG="info")
    cli_env = dict(env, RACKLET_LOG="warn")
    os.sync()
    if drop:
        with open("/proc/sys/vm/drop_caches", "w") as out:
            out.write("3\n")
    daemon = subprocess.Popen(node.daemon_argv(update), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env=env)
    stamped = StampedLog(daemon.stderr, os.path.join(node.dir, "daemon.log"))
    try:
        deadline = time.monotonic() + 30
        while subprocess.run([update, "--json", "status"], env=cli_env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, timeout=30).returncode != 0:
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the daemon did not answer on D-Bus:\n" +
                                   "\n".join(line for _, line in stamped.lines[-20:]))
            time.sleep(0.1)
        started = time.monotonic()
        applied = subprocess.run([update, "--json", "apply", "--version", NEW_VERSION], env=cli_env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=3600)
        # The apply's end is the daemon's "installed" line (time-stamped here as
        # it arrives), not the CLI's exit (it adds its own start and D-Bus calls).
        cli_seconds = time.monotonic() - started
        if applied.returncode != 0:
            raise RuntimeError(f"apply exited {applied.returncode}: {applied.stdout}{applied.stderr}\n" +
                               "\n".join(line for _, line in stamped.lines[-20:]))
        status = json.loads(subprocess.run([update, "--json", "status"], env=cli_env, stdout=subprocess.PIPE,
                                           text=True, check=True).stdout)
        installed = stamped.first("installed; the next boot")
        seconds = installed - started if installed is not None else cli_seconds
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        stamped.thread.join(5)
    status = status.get("result", status)
    record = status.get("last_install") or {}
    return seconds, record.get("path"), (record.get("reason") or {}).get("code")


def measure(work, variant, name, update, bus_address, runs, drop, link_mbit):
    base_dir = os.path.join(work, "out", "base", variant)
    with open(os.path.join(work, "out", name, variant, "manifest.json")) as source:
        result_root_bytes = next(a["uncompressed_size"] for a in json.load(source)["artifacts"]
                                 if a["kind"] == "root-filesystem")
    times = {"delta": [], "full": []}
    paths = {}
    servers = []
    try:
        served = {}
        for kind, repo in (("delta", f"repo-{name}"), ("full", f"repo-{name}-full")):
            server, port = serve(os.path.join(work, repo), link_mbit)
            servers.append(server)
            served[kind] = (os.path.join(work, repo), port)
        for round_number in range(runs):
            for kind in ("delta", "full"):
                repo, port = served[kind]
                node_dir = os.path.join(work, "nodes", f"{name}-{kind}-{round_number}")
                node = Node(node_dir, base_dir, port, repo, result_root_bytes)
                try:
                    seconds, path, reason = apply_once(node, update, bus_address, drop)
                finally:
                    shutil.rmtree(node_dir, ignore_errors=True)
                times[kind].append(seconds)
                paths[kind] = (path, reason)
                log(f"{name} {kind} run {round_number + 1}: {seconds:.2f} s, path {path} ({reason})")
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    return {
        "link_mbit": link_mbit,
        "delta_seconds": statistics.median(times["delta"]),
        "full_seconds": statistics.median(times["full"]),
        "delta_path": paths["delta"][0],
        "delta_reason": paths["delta"][1],
        "full_path": paths["full"][0],
        "runs": times,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True)
    parser.add_argument("--variant", required=True)
    parser.add_argument("--update", required=True)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--link-mbit", type=float, default=0,
                        help="pace each HTTP response at this rate (0: no limit)")
    args = parser.parse_args()

    drop = can_drop_caches()
    bus_dir = os.path.join(args.work, "bus")
    os.makedirs(bus_dir, exist_ok=True)
    bus_conf = os.path.join(bus_dir, "bus.conf")
    with open(bus_conf, "w") as out:
        out.write(
            "<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN\" "
            "\"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">\n"
            f"<busconfig><type>session</type><listen>unix:path={bus_dir}/socket</listen>"
            "<auth>EXTERNAL</auth><policy context=\"default\"><allow send_destination=\"*\" "
            "eavesdrop=\"true\"/><allow eavesdrop=\"true\"/><allow own=\"*\"/></policy></busconfig>\n")
    bus = subprocess.Popen(["dbus-daemon", f"--config-file={bus_conf}", "--nofork", "--print-address=1"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    bus_address = bus.stdout.readline().strip()
    if not bus_address:
        raise SystemExit("delta_apply: dbus-daemon printed no address")
    results = {}
    try:
        for name in CHANGES:
            try:
                results[name] = measure(args.work, args.variant, name, args.update, bus_address,
                                        args.runs, drop, args.link_mbit)
                if results[name]["delta_path"] != "delta":
                    results[name]["error"] = (f"the agent took the {results[name]['delta_path']} path "
                                              f"({results[name]['delta_reason']}) from the repository with the delta")
                    del results[name]["delta_seconds"]
            except Exception as error:  # noqa: BLE001 - reported per change
                log(f"{name}: {error}")
                results[name] = {"error": str(error).splitlines()[0]}
    finally:
        bus.kill()
        bus.wait()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
