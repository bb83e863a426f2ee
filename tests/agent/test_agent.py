#!/usr/bin/env python3
"""End-to-end tests of the update agent (`racklet-update daemon` + its CLI).

Each case builds a small world in a temporary directory: a GPT disk image
file whose slot A holds version 1.0.0's root and dm-verity tree (PARTUUIDs
from its root hash) and whose slot B is empty, an ESP directory laid out for
systemd-boot or for U-Boot (the boot loader is simulated: see
run_systemd_boot and run_boot_script), a kernel command line and an
os-release file, a TUF repository
published by `racklet-image` from synthetic builds (real dm-verity trees, see
make_build.py) and served over HTTP on 127.0.0.1 by a server that can
misbehave (truncate, add bytes, throttle, drop the connection), and the
daemon on a private dbus-daemon. The CLI talks to it through
DBUS_SYSTEM_BUS_ADDRESS, as an operator would. Cases where the boot loader
matters run once per boot loader: `name` with systemd-boot, `name[u-boot]`
with U-Boot (`-k '[u-boot]'` selects those).

Expired metadata is made by running the publisher under faketime (10 days
in the past); everything else runs on the real clock. Cases that fail
because of a known agent bug are listed in KNOWN_BUGS: they still run and
still count as failures, with the bug named in the output.

Python 3 standard library only. Usage:

    test_agent.py [-k SUBSTRING]... [--keep]

Environment: RACKLET_UPDATE, RACKLET_IMAGE (binaries; default
target/debug/...), RACKLET_AGENT_TEST_TMP (where the scratch directory goes).
Prints `ok`/`FAIL` per case and `N passed, M failed` at the end; exits 1 on
any failure.
"""

import fnmatch
import glob
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # no __pycache__ in the work tree
import make_build  # noqa: E402

# The U-Boot environment format and boot.cmd's choice of copy, shared with the VM tests.
sys.path.insert(0, os.path.join(TOP, "tests", "vm"))
from harness import (  # noqa: E402
    COMMITTED_BOOT_TRIES, committed_uki_slot, decode_uboot_env, encode_uboot_env, hex_or_zero, uboot_newest,
)

UPDATE = os.environ.get("RACKLET_UPDATE", os.path.join(TOP, "target", "debug", "racklet-update"))
IMAGE = os.environ.get("RACKLET_IMAGE", os.path.join(TOP, "target", "debug", "racklet-image"))
VARIANT = "qemu-x86_64"
# The version built as a small change of 1.0.0 (see Suite.setup).
DELTA_VERSION = "2.0.0"
OTHER_SOURCE_VERSION = "1.5.0"
MIB = 1 << 20
SECTOR = 512
# Uncompressed root of every synthetic build: more than one of the agent's
# 4 MiB write buffers, so a throttled download is caught with bytes written.
# RACKLET_AGENT_ROOT_MIB (measurements only, e.g. of a delta's time and
# memory at a real root's size) makes every root that large.
ROOT_BYTES = int(os.environ.get("RACKLET_AGENT_ROOT_MIB", "6")) * MIB
ROOT_PART_MIB = ROOT_BYTES // MIB + 2
VERITY_PART_MIB = ROOT_BYTES // MIB // 64 + 1
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ROOT_TYPE = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
VERITY_TYPE = "2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5"
VAR_TYPE = "4D21B016-B534-45C2-A9FB-5C16E091FD2D"
LOADER_CONF = "timeout 0\neditor no\nauto-entries no\nauto-firmware no\nconsole-mode keep\n"
TRY_PATTERN = "racklet-b[.+][e1-9]*"
# The systemd-boot default naming a committed slot: its UKI with boots left.
COMMITTED_PATTERN = {slot: f"racklet-{slot}[.+][e1-{COMMITTED_BOOT_TRIES}]*" for slot in "ab"}
BOOT_LOADERS = ("systemd-boot", "u-boot")
# U-Boot's A/B state (os-format/src/boot_state.rs, image-builder/assets/u-boot/boot.cmd).
UBOOT_STATE_COPIES = ("racklet/state-1.env", "racklet/state-2.env")
UBOOT_COMMITTED_B = "racklet/committed-b"
UBOOT_KEYS = ("racklet_seq", "racklet_order", "racklet_committed", "racklet_tries_a", "racklet_tries_b")
# Every key the script exports: the above and the committed slots' boot counts.
UBOOT_EXPORTED = UBOOT_KEYS + ("racklet_boots_a", "racklet_boots_b")
ANSI = re.compile(r"\x1b\[[0-9;]*m")

# Cases that fail because of a known agent bug: name -> the bug. They still
# run, and still count as failures; the note says why.
KNOWN_BUGS: dict[str, str] = {}  # all bugs found so far are fixed


class TestFailure(Exception):
    pass


def check(condition, message):
    if not condition:
        raise TestFailure(message)


def check_equal(found, expected, what):
    if found != expected:
        raise TestFailure(f"{what}: expected {expected!r}, found {found!r}")


def check_in(needle, haystack, what):
    if needle.lower() not in str(haystack).lower():
        raise TestFailure(f"{what}: expected to contain {needle!r}, found {haystack!r}")


def sha256_file(path, offset=0, length=None):
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        source.seek(offset)
        remaining = length
        while remaining is None or remaining > 0:
            block = source.read(MIB if remaining is None else min(MIB, remaining))
            if not block:
                break
            digest.update(block)
            if remaining is not None:
                remaining -= len(block)
    return digest.hexdigest()


def guid_text(hex32):
    h = hex32.lower()
    return f"{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def partuuids_for(root_hash):
    """(root, verity) PARTUUIDs by the DPS rule (os-format layout.rs)."""
    return guid_text(root_hash[:32]), guid_text(root_hash[32:])


def run(argv, check_rc=True, **kwargs):
    result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    if check_rc and result.returncode != 0:
        raise TestFailure(f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout, what, interval=0.1):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise TestFailure(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


# --- the boot loaders, simulated ---------------------------------------------------


def read_or_none(path):
    try:
        with open(path, "rb") as source:
            return source.read()
    except FileNotFoundError:
        return None


def run_boot_script(esp):
    """One run of image-builder/assets/u-boot/boot.cmd on the ESP `esp`, step
    by step: the committed slot from the marker, the valid copy with the
    higher racklet_seq (copy 1 on a tie), the order walked; a counted slot's
    tries are decremented and written with racklet_seq + 1 to the older copy
    before its UKI is loaded; nothing startable: the marker's slot. Returns
    the slot whose UKI it boots (None: nothing bootable, reset)."""
    committed = "b" if os.path.exists(os.path.join(esp, UBOOT_COMMITTED_B)) else "a"
    copies = [decode_uboot_env(read_or_none(os.path.join(esp, copy))) for copy in UBOOT_STATE_COPIES]
    env = {"racklet_committed": committed, "racklet_order": committed,
           "racklet_tries_a": "-", "racklet_tries_b": "-"}
    newest = uboot_newest(copies)
    if newest is not None:
        # `env import` with a list: listed keys the copy lacks are deleted;
        # the script then sets missing boot counts to 0.
        for key in UBOOT_EXPORTED:
            if key in copies[newest]:
                env[key] = copies[newest][key]
            else:
                env.pop(key, None)
        for key in ("racklet_boots_a", "racklet_boots_b"):
            env.setdefault(key, "0")

    def uki_exists(slot):
        return os.path.exists(os.path.join(esp, "EFI", "Linux", f"racklet-{slot}.efi"))

    def write():
        env["racklet_seq"] = f"{hex_or_zero(env.get('racklet_seq')) + 1:x}"
        exported = {name: env[name] for name in UBOOT_EXPORTED if name in env}
        with open(os.path.join(esp, UBOOT_STATE_COPIES[1 - newest]), "wb") as out:  # fatwrite to the older copy
            out.write(encode_uboot_env(exported))

    # The order, then the committed slot.
    for slot in env["racklet_order"].split() + [env["racklet_committed"]]:
        tries_key, boots_key = f"racklet_tries_{slot}", f"racklet_boots_{slot}"
        tries = env[tries_key]
        go = False
        if newest is None:
            go = True  # no valid state: the committed slot, uncounted
        elif tries == "-":
            boots = hex_or_zero(env[boots_key])
            if boots < COMMITTED_BOOT_TRIES:
                env[boots_key] = f"{boots + 1:x}"
                write()
                go = True
        elif hex_or_zero(tries) > 0:
            env[tries_key] = f"{hex_or_zero(tries) - 1:x}"
            write()
            go = True
        if go and uki_exists(slot):
            return slot
    return None  # the script stops: no slot can be started


def committed_name(name):
    """systemd-boot: "A" or "B" for a committed UKI with boots left
    (racklet-a.efi, racklet-a+3.efi, +2-1, +1-2), else the name itself."""
    slot = committed_uki_slot(name)
    return slot.upper() if slot else name


def loader_conf_default(esp):
    """The last `default` of the ESP's loader/loader.conf (None: none)."""
    value = None
    with open(os.path.join(esp, "loader", "loader.conf")) as source:
        for line in source:
            if line.startswith("default "):
                value = line.split(None, 1)[1].strip()
    return value


def run_systemd_boot(esp):
    """One start of systemd-boot 252 on the ESP `esp`, as
    update-agent/src/boot_control/systemd_boot.rs describes it: every
    EFI/Linux/*.efi is an entry whose id is its lower-cased file name; entries
    with no tries left sort last, then by id (the synthetic UKIs carry no
    .osrel version); the first entry matching loader.conf's last `default`
    glob is booted, else the first entry; a counted entry `+LEFT[-DONE]` is
    renamed to `+(LEFT-1)-(DONE+1)` before it boots. Returns the booted slot
    (None: no entry)."""
    linux = os.path.join(esp, "EFI", "Linux")
    entries = []
    for name in os.listdir(linux):
        match = re.fullmatch(r"(racklet-([ab]))(?:\+(\d+)(?:-(\d+))?)?\.efi", name.lower())
        if name.startswith((".", "auto-")) or not match:
            continue
        left = None if match.group(3) is None else int(match.group(3))
        entries.append((left == 0, name.lower(), name, match, left))
    entries.sort()
    default = loader_conf_default(esp)
    chosen = next((entry for entry in entries if default and fnmatch.fnmatchcase(entry[1], default)),
                  entries[0] if entries else None)
    if chosen is None:
        return None
    _, _, name, match, left = chosen
    if left:
        done = int(match.group(4) or 0)
        os.rename(os.path.join(linux, name), os.path.join(linux, f"{match.group(1)}+{left - 1}-{done + 1}.efi"))
    return match.group(2)


# What the ESP and `status` show while slot B is updated (slot A keeps the
# image's first version). Per situation and boot loader: the names in
# EFI/Linux (systemd-boot: "A" and "B" stand for the slot's committed UKI,
# uncounted or counted with boots left; see committed_name), what may be the boot loader's state (systemd-boot: loader.conf's
# default; U-Boot: order, committed, tries of a and b of the newest copy),
# and slot B's boot_state in `status`; then next_boot for both.
BOOT_SITUATIONS = {
    # B's new UKI placed with one try, not booted yet.
    "b-try": {
        "systemd-boot": (["A", "racklet-b+1.efi"], {TRY_PATTERN}, "trying (1 tries left)"),
        "u-boot": (["racklet-a.efi", "racklet-b.efi"], {("b a", "a", "-", "1")}, "trying (1 tries left)"),
        "next_boot": "b",
    },
    # B's try used: B runs it, or it died and the boot loader fell back to A.
    "b-tried": {
        "systemd-boot": (["A", "racklet-b+0-1.efi"], {TRY_PATTERN}, "trying (0 tries left)"),
        "u-boot": (["racklet-a.efi", "racklet-b.efi"], {("b a", "a", "-", "0")}, "trying (0 tries left)"),
        "next_boot": "a",
    },
    # B committed, A the good fallback.
    "b-good": {
        "systemd-boot": (["A", "B"], {COMMITTED_PATTERN["b"]}, "good"),
        "u-boot": (["racklet-a.efi", "racklet-b.efi"], {("b a", "b", "-", "-")}, "good"),
        "next_boot": "b",
    },
    # Rolled back: A committed, B the good fallback.
    "a-good": {
        "systemd-boot": (["A", "B"], {COMMITTED_PATTERN["a"]}, "good"),
        "u-boot": (["racklet-a.efi", "racklet-b.efi"], {("a b", "a", "-", "-")}, "good"),
        "next_boot": "a",
    },
    # B marked bad (systemd-boot removes its UKI: systemd-bless-boot cannot bless it then).
    "b-bad": {
        "systemd-boot": (["A"], {COMMITTED_PATTERN["a"]}, "absent"),
        "u-boot": (["racklet-a.efi", "racklet-b.efi"], {("a", "a", "-", "0")}, "bad"),
        "next_boot": "a",
    },
    # No UKI for B (never installed, or made unbootable).
    "b-absent": {
        "systemd-boot": (["A"], {None, COMMITTED_PATTERN["a"]}, "absent"),
        "u-boot": (["racklet-a.efi"], {("a", "a", "-", "-"), ("a", "a", "-", "0")}, "absent"),
        "next_boot": "a",
    },
}


# --- the repository server -----------------------------------------------------


class RepoHandler(http.server.BaseHTTPRequestHandler):
    """Serves server.directory; rules (substring of the path -> behaviour)
    make it misbehave for matching files. Supports `Range: bytes=N-`."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # quiet
        pass

    def do_HEAD(self):
        self.do_GET(head=True)

    def do_GET(self, head=False):
        server = self.server
        path = self.path.split("?", 1)[0]
        local = os.path.normpath(os.path.join(server.directory, path.lstrip("/")))
        range_header = self.headers.get("Range")
        with server.lock:
            server.requests.append((path, range_header))
            rule = None
            for needle, behaviour in server.rules.items():
                if needle in path:
                    rule = behaviour
                    break
            if rule is not None and rule.get("count") is not None:
                if rule["count"] <= 0:
                    rule = None
                else:
                    rule["count"] -= 1
        if not local.startswith(os.path.normpath(server.directory)) or not os.path.isfile(local):
            body = b"not found\n"
            self.send_response(404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)
            return
        with open(local, "rb") as source:
            data = source.read()
        mode = rule["mode"] if rule else None
        if mode == "truncate":
            data = data[: len(data) // 2]
        elif mode == "extra":
            data = data + os.urandom(rule.get("bytes", 65536))
        elif mode == "gone" and rule.get("dropped"):
            mode = "refuse"
        elif mode == "gone":
            # The first answer breaks off half-way; the server is gone after that.
            rule["dropped"] = True
            mode = "drop"
        if mode == "refuse":
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
        if match and int(match.group(1)) < len(data):
            start = int(match.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("Accept-Ranges", "bytes")
        if mode == "drop":
            self.send_header("Connection", "close")
        self.end_headers()
        if head:
            return
        body = data[start:]

        def send(part, rate=None):
            """Write `part` (at `rate` bytes/s if given), counting what is served."""
            chunk = 64 * 1024 if rate else max(1, len(part))
            for index in range(0, len(part), chunk):
                piece = part[index : index + chunk]
                self.wfile.write(piece)
                self.wfile.flush()
                with server.lock:
                    server.served[path] = server.served.get(path, 0) + len(piece)
                if rate:
                    time.sleep(len(piece) / rate)

        try:
            if mode == "drop":
                # Half the body (at `rate` bytes/s if given), then the connection goes away.
                send(body[: len(body) // 2], rule.get("rate"))
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            if mode == "stall":
                # Half the body, then silence (the client's timeout), then close.
                send(body[: len(body) // 2])
                time.sleep(rule.get("seconds", 5))
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            if mode == "throttle":
                # The first `fast` bytes at once, the rest at `rate` bytes/s.
                fast = max(0, rule.get("fast", 0) - start)
                send(body[:fast])
                send(body[fast:], rule.get("rate", MIB))
                return
            send(body)
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True


class RepoServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port):
        super().__init__(("127.0.0.1", port), RepoHandler)
        self.directory = "/nonexistent"
        self.rules = {}
        self.requests = []
        self.served = {}
        self.lock = threading.Lock()

    def handle_error(self, request, client_address):
        pass  # clients that go away (a killed daemon) are expected here

    def reset(self, directory):
        with self.lock:
            self.directory = directory
            self.rules = {}
            self.requests = []
            self.served = {}

    def set_rule(self, needle, **behaviour):
        with self.lock:
            self.rules[needle] = behaviour

    def clear_rules(self):
        with self.lock:
            self.rules = {}


# --- the suite's shared pieces ----------------------------------------------------


# The suite's bus lets its user (root) call anything.
OPEN_BUS_POLICY = ("<policy context=\"default\"><allow send_destination=\"*\" eavesdrop=\"true\"/>"
                   "<allow eavesdrop=\"true\"/><allow own=\"*\"/></policy>")


def start_bus(directory, kind, rules):
    """A dbus-daemon of `kind` (session, system) listening on
    `directory`/socket with the policy XML `rules`; returns (its process, its
    address)."""
    config = os.path.join(directory, "bus.conf")
    with open(config, "w") as out:
        out.write(
            "<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN\"\n"
            " \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">\n"
            f"<busconfig><type>{kind}</type><listen>unix:path={directory}/socket</listen>"
            f"<auth>EXTERNAL</auth>{rules}</busconfig>\n"
        )
    log = os.path.join(directory, "dbus-daemon.log")
    process = subprocess.Popen(
        ["dbus-daemon", f"--config-file={config}", "--nofork", "--print-address=1"],
        stdout=subprocess.PIPE, stderr=open(log, "w"), text=True,
    )
    address = process.stdout.readline().strip()
    if not address:
        process.kill()
        with open(log) as source:
            raise RuntimeError(f"dbus-daemon ({kind}) printed no address: {source.read().strip()}")
    return process, address


class Suite:
    def __init__(self, keep=False):
        self.keep = keep
        base = os.environ.get("RACKLET_AGENT_TEST_TMP") or None
        self.tmp = tempfile.mkdtemp(prefix="racklet-agent-test.", dir=base)
        self.dbus = None
        self.server = None
        # Directories outside tmp to remove at the end.
        self.cleanup = []

    def setup(self):
        self.keys = os.path.join(self.tmp, "keys")
        run([IMAGE, "keys", "generate", "--dir", self.keys])
        self.repo_cache = {}
        self.builds = {}
        for version in ("1.0.0", "1.1.0", "1.2.0"):
            directory = os.path.join(self.tmp, "builds", version)
            manifest = make_build.make_build(directory, version, ROOT_BYTES, VARIANT)
            self.builds[version] = Build(directory, manifest)
        # A small update of 1.0.0 (a few blocks of its root, the version in
        # its UKIs): what the publisher's delta patches rebuild on the node.
        # 1.5.0 too, another small change of 1.0.0: a delta source the
        # node does not run.
        for version in (DELTA_VERSION, OTHER_SOURCE_VERSION):
            directory = os.path.join(self.tmp, "builds", version)
            manifest = make_build.make_build(directory, version, ROOT_BYTES, VARIANT,
                                             base=self.builds["1.0.0"].directory)
            self.builds[version] = Build(directory, manifest)
        # A private bus, configured like the session bus.
        bus_dir = os.path.join(self.tmp, "bus")
        os.makedirs(bus_dir)
        self.dbus, self.bus_address = start_bus(bus_dir, "session", OPEN_BUS_POLICY)
        self.port = free_port()
        self.server = RepoServer(self.port)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.port}"
        # The same repository over HTTPS, its certificate (for localhost and
        # 127.0.0.1) from a throwaway CA that only SSL_CERT_FILE or
        # extra_ca_certificates make trusted.
        tls = os.path.join(self.tmp, "tls")
        os.makedirs(tls)
        self.test_ca = os.path.join(tls, "ca.pem")
        run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-subj", "/CN=racklet-agent-test-ca", "-days", "1", "-keyout", os.path.join(tls, "ca.key"),
             "-out", self.test_ca, "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-subj", "/CN=localhost", "-keyout", os.path.join(tls, "server.key"),
             "-out", os.path.join(tls, "server.csr")])
        with open(os.path.join(tls, "server.ext"), "w") as out:
            out.write("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
                      "basicConstraints=CA:FALSE\n")
        run(["openssl", "x509", "-req", "-in", os.path.join(tls, "server.csr"), "-CA", self.test_ca,
             "-CAkey", os.path.join(tls, "ca.key"), "-CAcreateserial", "-days", "1",
             "-extfile", os.path.join(tls, "server.ext"), "-out", os.path.join(tls, "server.pem")])
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(os.path.join(tls, "server.pem"), os.path.join(tls, "server.key"))
        self.tls_port = free_port()
        self.tls_server = RepoServer(self.tls_port)
        self.tls_server.socket = context.wrap_socket(self.tls_server.socket, server_side=True)
        threading.Thread(target=self.tls_server.serve_forever, daemon=True).start()
        self.tls_url = f"https://localhost:{self.tls_port}"

    def teardown(self):
        for server in (self.server, getattr(self, "tls_server", None)):
            if server:
                server.shutdown()
                server.server_close()
        if self.dbus:
            self.dbus.terminate()
            try:
                self.dbus.wait(5)
            except subprocess.TimeoutExpired:
                self.dbus.kill()
        for directory in self.cleanup:
            shutil.rmtree(directory, ignore_errors=True)
        if not self.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)


class Build:
    def __init__(self, directory, manifest):
        self.directory = directory
        self.manifest = manifest
        self.version = manifest["version"]
        self.root_hash = manifest["verity"]["root_hash"]
        self.root_img = os.path.join(directory, "raw", "root.img")
        self.verity_img = os.path.join(directory, "raw", "verity.img")
        self.uki_b = os.path.join(directory, "raw", "uki-b.efi")
        self.uki_a = os.path.join(directory, "raw", "uki-a.efi")

    def target_name(self, artifact):
        return f"{VARIANT}-{self.version}-{artifact}"


class Result:
    def __init__(self, completed):
        self.rc = completed.returncode
        self.out = completed.stdout
        self.err = completed.stderr
        try:
            self.json = json.loads(self.out) if self.out.strip() else None
        except json.JSONDecodeError:
            self.json = None

    def __repr__(self):
        return f"<exit {self.rc}: stdout {self.out.strip()!r} stderr {self.err.strip()!r}>"


# --- one test's node -----------------------------------------------------------


class Node:
    """A disk, an ESP for `boot_loader` (one of BOOT_LOADERS), a state
    directory, a repository and a daemon."""

    def __init__(self, suite, name, config="", http_timeout=10, health="", boot_loader="systemd-boot"):
        check(boot_loader in BOOT_LOADERS, f"unknown boot loader {boot_loader!r}")
        self.suite = suite
        self.boot_loader = boot_loader
        self.dir = os.path.join(suite.tmp, name)
        os.makedirs(self.dir)
        self.repo = os.path.join(self.dir, "repo")
        self.disk = os.path.join(self.dir, "disk.img")
        self.esp = os.path.join(self.dir, "esp")
        self.state_dir = os.path.join(self.dir, "state")
        self.tuf_dir = os.path.join(self.state_dir, "tuf")
        self.cmdline = os.path.join(self.dir, "cmdline")
        self.os_release = os.path.join(self.dir, "os-release")
        self.config = os.path.join(self.dir, "update.toml")
        self.defaults = os.path.join(self.dir, "defaults.toml")  # absent
        self.marker = os.path.join(self.dir, "reboot-marker")
        self.checks = os.path.join(self.dir, "health.d")
        self.log = os.path.join(self.dir, "daemon.log")
        os.makedirs(self.checks)
        self.daemon = None
        self.write_config(config, http_timeout, health)
        self.make_disk()
        self.make_esp()
        self.boot("a", suite.builds["1.0.0"])
        suite.server.reset(self.repo)
        suite.tls_server.reset(self.repo)
        # Extra environment of the daemon (e.g. SSL_CERT_FILE).
        self.extra_env = {}

    # -- files --
    def write_config(self, extra="", http_timeout=10, health="", automatic=False, base=None):
        """update.toml; `automatic`: auto_apply and auto_reboot on (the timer's way);
        `base`: the repository's URL (default: the suite's plain HTTP server)."""
        base = base or self.suite.base_url
        auto = "true" if automatic else "false"
        with open(self.config, "w") as out:
            out.write(
                f'metadata_url = "{base}/metadata/"\n'
                f'targets_url = "{base}/targets/"\n'
                "check_interval_seconds = 3600\n"
                "check_jitter_seconds = 0\n"
                f"auto_apply = {auto}\n"
                f"auto_reboot = {auto}\n"
                f"http_timeout_seconds = {http_timeout}\n"
                f"{extra}\n"
                "[health]\n"
                + (health or 'timeout_seconds = 20\nrequired_units = []\n') +
                f'checks_dir = "{self.checks}"\n'
                "k3s_node_ready = false\n"
            )

    def make_disk(self):
        """The suite's template disk (sgdisk sleeps a second per call), copied."""
        template = os.path.join(self.suite.tmp, "disk-template.img")
        if not os.path.exists(template):
            self.make_template_disk(template)
        shutil.copyfile(template, self.disk)
        self.slot_a_before = self.suite.slot_a_fingerprint

    def make_template_disk(self, path):
        build = self.suite.builds["1.0.0"]
        root_uuid, verity_uuid = partuuids_for(build.root_hash)
        size_mib = 1 + 8 + 2 * (ROOT_PART_MIB + VERITY_PART_MIB) + 2 + 1
        with open(path, "wb") as out:
            out.truncate(size_mib * MIB)
        run([
            "sgdisk", "-o",
            "-n", "1:0:+8M", "-t", f"1:{ESP_TYPE}", "-c", "1:esp",
            "-n", f"2:0:+{ROOT_PART_MIB}M", "-t", f"2:{ROOT_TYPE}", "-c", "2:root-a",
            "-n", f"3:0:+{VERITY_PART_MIB}M", "-t", f"3:{VERITY_TYPE}", "-c", "3:verity-a",
            "-n", f"4:0:+{ROOT_PART_MIB}M", "-t", f"4:{ROOT_TYPE}", "-c", "4:root-b",
            "-n", f"5:0:+{VERITY_PART_MIB}M", "-t", f"5:{VERITY_TYPE}", "-c", "5:verity-b",
            "-n", "6:0:0", "-t", f"6:{VAR_TYPE}", "-c", "6:data",
            "-u", f"2:{root_uuid}", "-u", f"3:{verity_uuid}",
            path,
        ])
        parts = self.partitions(path)
        with open(path, "r+b") as disk:
            for name, source in (("root-a", build.root_img), ("verity-a", build.verity_img)):
                with open(source, "rb") as data:
                    disk.seek(parts[name]["offset"])
                    disk.write(data.read())
        self.suite.slot_a_fingerprint = self.slot_fingerprint("a", path)

    def partitions(self, disk=None):
        table = json.loads(run(["sfdisk", "--json", disk or self.disk]).stdout)["partitiontable"]
        sector = table.get("sectorsize", SECTOR)
        result = {}
        for part in table["partitions"]:
            result[part["name"]] = {
                "offset": part["start"] * sector,
                "size": part["size"] * sector,
                "uuid": part["uuid"].lower(),
            }
        return result

    def slot_fingerprint(self, slot, disk=None):
        disk = disk or self.disk
        parts = self.partitions(disk)
        fingerprint = {}
        for name in (f"root-{slot}", f"verity-{slot}"):
            part = parts[name]
            fingerprint[name] = (part["uuid"], sha256_file(disk, part["offset"], part["size"]))
        return fingerprint

    def make_esp(self):
        """The ESP as the image builder writes it (image-builder/src/bootloader.rs),
        with dummy boot loader binaries: systemd-boot's loader.conf, or U-Boot's
        boot.scr and both state copies saying slot A is committed (sequence 1)."""
        os.makedirs(os.path.join(self.esp, "EFI", "Linux"))
        if self.boot_loader == "u-boot":
            os.makedirs(os.path.join(self.esp, "racklet"))
            with open(os.path.join(self.esp, "boot.scr"), "wb") as out:
                out.write(b"dummy boot.scr (run_boot_script simulates boot.cmd)\n")
            fresh = encode_uboot_env({"racklet_seq": "1", "racklet_order": "a", "racklet_committed": "a",
                                      "racklet_tries_a": "-", "racklet_tries_b": "-"})
            for copy in UBOOT_STATE_COPIES:
                with open(os.path.join(self.esp, copy), "wb") as out:
                    out.write(fresh)
        else:
            os.makedirs(os.path.join(self.esp, "loader"))
            os.makedirs(os.path.join(self.esp, "EFI", "systemd"))
            with open(os.path.join(self.esp, "loader", "loader.conf"), "w") as out:
                out.write(LOADER_CONF)
            with open(os.path.join(self.esp, "EFI", "systemd", "systemd-bootx64.efi"), "wb") as out:
                out.write(b"MZ dummy systemd-boot\n")
        shutil.copyfile(self.suite.builds["1.0.0"].uki_a, self.esp_file("racklet-a.efi"))
        self.uki_a_sha = sha256_file(self.esp_file("racklet-a.efi"))

    def esp_file(self, name):
        return os.path.join(self.esp, "EFI", "Linux", name)

    def esp_names(self):
        return sorted(os.listdir(os.path.join(self.esp, "EFI", "Linux")))

    def loader_default(self):
        return loader_conf_default(self.esp)

    def boot(self, slot, build):
        """What a boot into `slot` running `build` shows the agent."""
        with open(self.cmdline, "w") as out:
            out.write(
                f"BOOT_IMAGE=/vmlinuz console=ttyS0 ro quiet racklet.slot={slot} "
                f"racklet.roothash={build.root_hash}\n"
            )
        with open(self.os_release, "w") as out:
            out.write(
                'NAME="Racklet OS"\nID=racklet\nIMAGE_ID=racklet-os\n'
                f"IMAGE_VERSION={build.version}\nVARIANT_ID={VARIANT}\nARCHITECTURE=x86_64\n"
            )
        past = time.time() - 30 * 86400
        os.utime(self.os_release, (past, past))

    def uboot_copies(self):
        """Both U-Boot state copies, decoded (None: damaged or missing)."""
        return [decode_uboot_env(read_or_none(os.path.join(self.esp, copy))) for copy in UBOOT_STATE_COPIES]

    def uboot_newest(self):
        """Index of the copy U-Boot's script reads."""
        newest = uboot_newest(self.uboot_copies())
        check(newest is not None, f"no valid U-Boot state copy: {self.uboot_copies()}")
        return newest

    def start_boot_loader(self):
        """The machine starts once (the daemon must be stopped): the boot
        loader changes what it changes on the ESP and returns the slot it
        boots (None: nothing bootable)."""
        check(self.daemon is None, "the boot loader runs while the daemon does")
        if self.boot_loader == "u-boot":
            return run_boot_script(self.esp)
        return run_systemd_boot(self.esp)

    def reboot_into(self, slot, build):
        """A reboot that must start `slot` running `build`; what status said
        would boot next (the daemon, if running, is stopped) must agree."""
        predicted = self.status()["next_boot"] if self.daemon else None
        self.stop()
        booted = self.start_boot_loader()
        check_equal(booted, slot, f"the slot {self.boot_loader} booted")
        if predicted is not None:
            check_equal(predicted, booted, "status next_boot before the reboot")
        self.boot(slot, build)

    def lose_last_boot_loader_write(self):
        """A power cut lost the agent's last boot-loader write (vfat did not
        have it on the disk yet): systemd-boot's loader.conf keeps its old
        default, U-Boot's newest state copy is torn (its CRC fails)."""
        check(self.daemon is None, "lose_last_boot_loader_write while the daemon runs")
        if self.boot_loader == "u-boot":
            path = os.path.join(self.esp, UBOOT_STATE_COPIES[self.uboot_newest()])
            with open(path, "r+b") as copy:
                copy.seek(4)
                copy.write(bytes(200))
            check(decode_uboot_env(read_or_none(path)) is None, f"{path} is still valid")
            return
        conf = os.path.join(self.esp, "loader", "loader.conf")
        with open(conf) as source:
            text = source.read()
        with open(conf, "w") as target:
            target.write(text.replace(f"default {TRY_PATTERN}", f"default {COMMITTED_PATTERN['a']}"))
        check_equal(self.loader_default(), COMMITTED_PATTERN["a"], "loader.conf default put back")

    def check_boot(self, situation, what, uki_b=None):
        """The ESP shows `situation` (a key of BOOT_SITUATIONS) for this boot
        loader, slot B's UKI holds the bytes of `uki_b` (if given), and when the
        daemon runs, status's boot_slots and next_boot say the same."""
        names, states, b_state = BOOT_SITUATIONS[situation][self.boot_loader]
        what = f"{what} ({situation}, {self.boot_loader})"
        found = self.esp_names()
        if self.boot_loader == "systemd-boot":
            found = [committed_name(name) for name in found]
        check_equal(found, names, f"EFI/Linux {what}")
        if self.boot_loader == "u-boot":
            self.check_uboot_state(states, what)
        else:
            check(self.loader_default() in states,
                  f"loader.conf default {what}: expected one of {states}, found {self.loader_default()!r}")
        if uki_b is not None:
            b_name = [name for name in self.esp_names() if name.startswith("racklet-b")][0]
            check_equal(sha256_file(self.esp_file(b_name)), sha256_file(uki_b), f"{b_name} bytes {what}")
        if self.daemon is not None:
            status = self.status()
            check_equal({s["slot"]: s["boot_state"] for s in status["boot_slots"]}, {"a": "good", "b": b_state},
                        f"status boot states {what}")
            check_equal(status["next_boot"], BOOT_SITUATIONS[situation]["next_boot"], f"status next_boot {what}")

    def check_uboot_state(self, states, what):
        """The newest U-Boot state copy says one of `states` (order, committed,
        tries a, tries b), the marker names its committed slot, each valid copy
        is exactly what encode_uboot_env writes, the copies' sequences are at
        most one apart, and no temporary file is left in racklet/."""
        copies = self.uboot_copies()
        for index, copy in enumerate(copies):
            if copy is not None:
                raw = read_or_none(os.path.join(self.esp, UBOOT_STATE_COPIES[index]))
                check(encode_uboot_env(copy) == raw, f"{UBOOT_STATE_COPIES[index]} is not in U-Boot's export format")
        if all(copies):
            sequences = [hex_or_zero(copy["racklet_seq"]) for copy in copies]
            check(abs(sequences[0] - sequences[1]) <= 1, f"state copies' sequences {sequences} {what}")
        newest = copies[self.uboot_newest()]
        found = tuple(newest.get(key) for key in UBOOT_KEYS[1:])
        check(found in states, f"U-Boot state {what}: expected one of {sorted(states)}, found {found} in {newest}")
        marker = os.path.exists(os.path.join(self.esp, UBOOT_COMMITTED_B))
        check_equal(marker, newest["racklet_committed"] == "b", f"{UBOOT_COMMITTED_B} present {what}")
        check_equal(sorted(set(os.listdir(os.path.join(self.esp, "racklet"))) - {"committed-b"}),
                    ["state-1.env", "state-2.env"], f"racklet/ {what}")

    def add_check(self, name, script):
        path = os.path.join(self.checks, name)
        with open(path, "w") as out:
            out.write("#!/bin/sh\n" + script + "\n")
        os.chmod(path, 0o755)

    # -- repository --
    def publish(self, version, *extra, faketime=None):
        self._repo_step(("publish", version, *extra, faketime), [
            IMAGE, "publish", "--build", self.suite.builds[version].directory,
            "--repo", self.repo, "--keys", self.suite.keys, *extra], faketime)

    def repo_command(self, *args, faketime=None):
        self._repo_step(("repo", *args, faketime), [
            IMAGE, "repo", *args, "--repo", self.repo, "--keys", self.suite.keys], faketime)

    def _repo_step(self, step, argv, faketime):
        """Run one publisher command on this node's repository. The same
        sequence of commands from an empty repository is run once per suite
        and copied afterwards (publishing syncs every file and is slow)."""
        self.repo_steps = getattr(self, "repo_steps", ()) + (step,)
        cached = self.suite.repo_cache.get(self.repo_steps)
        if cached is not None:
            shutil.rmtree(self.repo, ignore_errors=True)
            shutil.copytree(cached, self.repo, symlinks=True)
            return
        if faketime:
            argv = ["faketime", "-f", faketime] + argv
        run(argv)
        copy = os.path.join(self.suite.tmp, "repo-cache", str(len(self.suite.repo_cache)))
        shutil.copytree(self.repo, copy, symlinks=True)
        self.suite.repo_cache[self.repo_steps] = copy

    def target_path(self, build, artifact):
        folder = os.path.join(self.repo, "targets")
        suffix = "." + build.target_name(artifact)
        names = [name for name in os.listdir(folder) if name.endswith(suffix)]
        check(len(names) == 1, f"expected one target *{suffix} in {folder}, found {names}")
        return os.path.join(folder, names[0])

    # -- daemon --
    def env(self):
        env = dict(os.environ)
        env["DBUS_SYSTEM_BUS_ADDRESS"] = self.suite.bus_address
        env.setdefault("RACKLET_LOG", "info")
        env.update(self.extra_env)
        return env

    def start(self, wait=True, timer=False):
        """`timer`: the daemon's own timer checks at once (and applies, with
        auto_apply); by default it is off and the test drives every step."""
        check(self.daemon is None, "daemon already running")
        with open(self.log, "a") as log:
            log.write(f"--- start {time.strftime('%H:%M:%S')}\n")
            self.daemon = subprocess.Popen(
                [
                    UPDATE, "daemon",
                    "--esp", self.esp, "--disk", self.disk,
                    "--state-dir", self.state_dir, "--tuf-datastore", self.tuf_dir,
                    "--tuf-root", os.path.join(self.repo, "metadata", "1.root.json"),
                    "--cmdline", self.cmdline, "--os-release", self.os_release,
                    "--config", self.config, "--config-defaults", self.defaults,
                    "--reboot-marker", self.marker, "--no-time-sync",
                    *([] if timer else ["--no-timer"]),
                ],
                stdout=log, stderr=log, env=self.env(),
            )
        if wait:
            def ready():
                if self.daemon.poll() is not None:
                    raise TestFailure(f"daemon exited {self.daemon.returncode}:\n{self.log_tail()}")
                return self.cli("status").rc == 0
            wait_until(ready, 15, "the daemon to answer on D-Bus")

    def stop(self):
        if self.daemon is None:
            return
        if self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(6)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()
        self.daemon = None

    def kill(self):
        """SIGKILL: a power cut, as far as the agent is concerned."""
        self.daemon.send_signal(signal.SIGKILL)
        self.daemon.wait()
        self.daemon = None

    def restart(self):
        self.stop()
        self.start()

    def log_tail(self, lines=40):
        try:
            with open(self.log) as source:
                return ANSI.sub("", "".join(source.readlines()[-lines:]))
        except OSError:
            return ""

    def cli(self, *args, timeout=120):
        completed = subprocess.run(
            [UPDATE, "--json", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(self.env(), RACKLET_LOG="warn"), timeout=timeout,
        )
        return Result(completed)

    def ok(self, *args, timeout=120):
        result = self.cli(*args, timeout=timeout)
        if result.rc != 0:
            raise TestFailure(f"racklet-update {' '.join(args)} failed: {result}\n--- daemon log:\n{self.log_tail()}")
        return result

    def status(self):
        return self.ok("status").json

    def close(self):
        self.stop()

    # -- checks on the outcome of an install --
    def assert_installed(self, build):
        """Slot B holds `build`, verified, bootable once; slot A untouched."""
        parts = self.partitions()
        root_b, verity_b = parts["root-b"], parts["verity-b"]
        data_size = os.path.getsize(build.root_img)
        check_equal(sha256_file(self.disk, root_b["offset"], data_size), sha256_file(build.root_img),
                    "sha256 of slot B's root range")
        hash_size = os.path.getsize(build.verity_img)
        check_equal(sha256_file(self.disk, verity_b["offset"], hash_size), sha256_file(build.verity_img),
                    "sha256 of slot B's hash device range")
        root_copy = os.path.join(self.dir, "root-b.bin")
        verity_copy = os.path.join(self.dir, "verity-b.bin")
        run(["dd", f"if={self.disk}", f"of={root_copy}", "bs=512", f"skip={root_b['offset'] // SECTOR}",
             f"count={root_b['size'] // SECTOR}", "status=none"])
        run(["dd", f"if={self.disk}", f"of={verity_copy}", "bs=512", f"skip={verity_b['offset'] // SECTOR}",
             f"count={verity_b['size'] // SECTOR}", "status=none"])
        with open(root_copy, "r+b") as copy:
            copy.truncate(data_size)  # the data device is the image's data blocks
        verify = run(["veritysetup", "verify", root_copy, verity_copy, build.root_hash], check_rc=False)
        check(verify.returncode == 0, f"veritysetup verify of slot B failed: {verify.stdout}{verify.stderr}")
        os.unlink(root_copy)
        os.unlink(verity_copy)
        sgdisk = run(["sgdisk", "-v", self.disk], check_rc=False)
        check(sgdisk.returncode == 0 and "No problems found" in sgdisk.stdout,
              f"sgdisk -v: {sgdisk.stdout}{sgdisk.stderr}")
        root_uuid, verity_uuid = partuuids_for(build.root_hash)
        check_equal((root_b["uuid"], verity_b["uuid"]), (root_uuid, verity_uuid), "slot B PARTUUIDs")
        self.check_boot("b-try", "after the install", uki_b=build.uki_b)
        self.assert_slot_a_untouched()

    def assert_slot_a_untouched(self):
        check_equal(self.slot_fingerprint("a"), self.slot_a_before, "slot A partitions (PARTUUIDs, bytes)")
        a_name = [name for name in self.esp_names() if name.startswith("racklet-a")][0]
        check_equal(sha256_file(self.esp_file(a_name)), self.uki_a_sha, f"{a_name} bytes")

    def assert_b_unbootable(self, new_build=None):
        self.check_boot("b-absent", "with slot B unbootable")
        if new_build is not None:
            parts = self.partitions()
            new = partuuids_for(new_build.root_hash)
            check((parts["root-b"]["uuid"], parts["verity-b"]["uuid"]) != new,
                  "slot B carries the new root hash's PARTUUIDs although its install failed")
        self.assert_slot_a_untouched()


# --- the cases -------------------------------------------------------------------

# (name, function, keyword arguments): run as function(suite, node_name, **arguments).
CASES = []


def case(function):
    CASES.append((function.__name__, function, {}))
    return function


def boot_loader_case(function):
    """A case run once per boot loader: `name` (systemd-boot) and `name[u-boot]`;
    the function takes the boot loader as its third argument."""
    for boot_loader in BOOT_LOADERS:
        suffix = "" if boot_loader == BOOT_LOADERS[0] else f"[{boot_loader}]"
        CASES.append((function.__name__ + suffix, function, {"boot_loader": boot_loader}))
    return function


def node_name_of(case_name):
    """The case's directory: `name[u-boot]` -> `name.u-boot` (no glob characters in paths)."""
    return re.sub(r"\[(.*)\]$", r".\1", case_name)


def standard_node(suite, name, versions=("1.0.0", "1.1.0"), config="", start=True, health="",
                  boot_loader="systemd-boot"):
    node = Node(suite, name, config, health=health, boot_loader=boot_loader)
    for version in versions:
        node.publish(version)
    if start:
        node.start()
    return node


@case
def dbus_api_introspection(suite, node_name):
    node = standard_node(suite, node_name, versions=("1.0.0",))
    try:
        text = run(["busctl", f"--address={suite.bus_address}", "introspect",
                    "org.racklet.Update1", "/org/racklet/Update1"]).stdout
        check_in("org.racklet.Update1", text, "introspection")
        for member, kind in [
            ("Status", "method"), ("Check", "method"), ("Apply", "method"), ("Cancel", "method"),
            ("Rollback", "method"), ("MarkGood", "method"), ("MarkBad", "method"),
            ("Operation", "property"), ("Progress", "property"), ("LastError", "property"),
            ("BootedSlot", "property"), ("BootedVersion", "property"), ("Changed", "signal"),
        ]:
            check(re.search(rf"^\.{member}\s+{kind}\b", text, re.M), f"introspection lacks {kind} {member}:\n{text}")
        check(re.search(r"^\.Apply\s+method\s+sbb\s+s\b", text, re.M), f"Apply's signature is not (sbb) -> s:\n{text}")
        check(re.search(r"^\.Progress\s+property\s+\(tt\)", text, re.M), f"Progress is not (tt):\n{text}")
        slot = run(["busctl", f"--address={suite.bus_address}", "get-property", "org.racklet.Update1",
                    "/org/racklet/Update1", "org.racklet.Update1", "BootedSlot"]).stdout.strip()
        check_equal(slot, 's "a"', "BootedSlot")
        version = run(["busctl", f"--address={suite.bus_address}", "get-property", "org.racklet.Update1",
                       "/org/racklet/Update1", "org.racklet.Update1", "BootedVersion"]).stdout.strip()
        check_equal(version, 's "1.0.0"', "BootedVersion")
        reply = run(["dbus-send", f"--bus={suite.bus_address}", "--print-reply=literal",
                     "--dest=org.racklet.Update1", "/org/racklet/Update1", "org.racklet.Update1.Status"]).stdout
        status = json.loads(reply.strip())
        check_equal(status["booted"]["slot"], "a", "Status() booted slot")
        check_equal(status["booted"]["version"], "1.0.0", "Status() booted version")
        check_equal(status["booted"]["variant"], VARIANT, "Status() variant")
        check_equal(status["booted"]["arch"], "x86_64", "Status() arch")
        # A refusal is org.racklet.Update1.Error.Refused.
        refused = run(["busctl", f"--address={suite.bus_address}", "call", "org.racklet.Update1",
                       "/org/racklet/Update1", "org.racklet.Update1", "Apply", "sbb", "not-a-version",
                       "false", "false"], check_rc=False)
        check(refused.returncode != 0, "Apply('not-a-version') succeeded")
        check_in("not a version", refused.stderr, "Apply('not-a-version') error")
    finally:
        node.close()


@case
def cli_without_daemon_says_so(suite, node_name):
    node = Node(suite, node_name)
    result = node.cli("status")
    check(result.rc != 0, f"status without a daemon succeeded: {result}")
    check_in("racklet-update.service running", result.err, "error without a daemon")


# --- callers other than root --------------------------------------------------------

# The user the cases below call as (nobody), and the agent's D-Bus policy file.
OTHER_UID = 65534
POLICY = os.path.join(TOP, "packages", "racklet-agents", "org.racklet.Update1.conf")
# The policy of RAUC's API, which the agent serves beside its own (docs/rauc.md).
RAUC_POLICY = os.path.join(TOP, "packages", "racklet-agents", "de.pengutronix.rauc.conf")
# The state-changing commands: (CLI arguments, D-Bus method).
STATE_CHANGES = [(("apply",), "Apply"), (("cancel",), "Cancel"), (("rollback",), "Rollback"),
                 (("mark-good",), "MarkGood"), (("mark-bad", "--reason", "x"), "MarkBad")]


def needs_root_line(args, method):
    """What the CLI prints (stderr) when `args` is refused for want of root."""
    return (f"error: racklet-update {args[0]}: refused: changing the update state needs root "
            f"(org.racklet.Update1.{method} is allowed to uid 0 only)")


class PrivateBus:
    """A dbus-daemon of a case's own that every user may connect to (its
    socket in a world-readable directory outside the suite's, which is
    root's only). `policy`: "system" is a system bus's default policy (method
    calls denied unless allowed) with the agent's policy file included, as on a
    node; "open" lets anyone call anything (a too permissive policy)."""

    def __init__(self, policy):
        self.dir = tempfile.mkdtemp(prefix="racklet-agent-bus.")
        os.chmod(self.dir, 0o755)
        if policy == "system":
            rules = (
                '<policy context="default"><allow user="*"/><deny own="*"/>'
                '<deny send_type="method_call"/><allow send_type="signal"/>'
                '<allow send_requested_reply="true" send_type="method_return"/>'
                '<allow send_requested_reply="true" send_type="error"/>'
                '<allow receive_type="method_call"/><allow receive_type="method_return"/>'
                '<allow receive_type="error"/><allow receive_type="signal"/>'
                '<allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>'
                '<allow send_destination="org.freedesktop.DBus"'
                ' send_interface="org.freedesktop.DBus.Introspectable"/>'
                '</policy>'
                f"<include>{POLICY}</include><include>{RAUC_POLICY}</include>")
            kind = "system"
        else:
            # The suite's bus, for every user.
            rules = OPEN_BUS_POLICY.replace("<policy context=\"default\">",
                                            "<policy context=\"default\"><allow user=\"*\"/>")
            kind = "session"
        self.process, self.address = start_bus(self.dir, kind, rules)

    def close(self):
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def as_user(node, uid, argv, timeout=120):
    """`argv` run as `uid` (and its group, no others) with the node's bus."""
    completed = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
        env=dict(node.env(), RACKLET_LOG="warn"), timeout=timeout)
    return Result(completed)


def other_user_binary(suite):
    """The CLI where `OTHER_UID` may run it: where it is, or a copy."""
    binary = os.path.abspath(UPDATE)
    probe = subprocess.run(["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups",
                            "--", binary, "--version"], capture_output=True, text=True, cwd="/")
    if probe.returncode == 0:
        return binary
    directory = tempfile.mkdtemp(prefix="racklet-agent-cli.")
    os.chmod(directory, 0o755)
    copy = os.path.join(directory, "racklet-update")
    shutil.copyfile(UPDATE, copy)
    os.chmod(copy, 0o755)
    suite.cleanup.append(directory)
    return copy


def refused_for_want_of_root(node, cli, uid):
    """Each state-changing command, run as `uid`, exits 2 with the one-line
    refusal naming the command and the method; nothing changes."""
    for args, method in STATE_CHANGES:
        result = as_user(node, uid, [cli, *args])
        check_equal(result.rc, 2, f"{' '.join(args)} as uid {uid}: {result}")
        check_in(needs_root_line(args, method), result.err.splitlines(), f"{' '.join(args)} as uid {uid}")
        with_json = as_user(node, uid, [cli, "--json", *args])
        check_equal(with_json.rc, 2, f"--json {' '.join(args)} as uid {uid}: {with_json}")
        check_equal(with_json.json, {"ok": False, "error": needs_root_line(args, method).removeprefix("error: ")},
                    f"--json {' '.join(args)} as uid {uid}")
    status = node.status()
    check_equal(status["state"]["operation"]["kind"], "idle", "operation after the refused calls")
    check_equal({s["slot"]: s["state"] for s in status["boot_slots"]}, {"a": "good", "b": "empty"},
                "slot states after the refused calls")
    node.assert_b_unbootable()


@case
def callers_other_than_root_read_and_check_but_change_nothing(suite, node_name):
    """On a bus with a system bus's policy and the agent's policy file, as
    on a node: a user other than root (nobody) reads the status and the
    properties and asks for a check, but a second check within a minute is
    refused (rate limited, saying when to try again) while root checks as
    often as it likes; apply, cancel, rollback, mark-good and mark-bad are
    refused by the bus, each with the CLI's one line naming the command and
    the method. Then on a bus that lets anyone call anything (a too
    permissive policy): the daemon refuses the same calls itself (the
    caller's UID from the bus), and root still installs an update."""
    check(os.geteuid() == 0, "this case runs the CLI as another user (setpriv): run tests/agent as root")
    check(shutil.which("setpriv") is not None, "setpriv (util-linux) is needed to call as another user")
    node = standard_node(suite, node_name, start=False)
    buses = []
    try:
        cli = other_user_binary(suite)
        system_bus = PrivateBus("system")
        buses.append(system_bus)
        node.extra_env["DBUS_SYSTEM_BUS_ADDRESS"] = system_bus.address
        node.start()
        # Reading: the status, a property, introspection.
        status = as_user(node, OTHER_UID, [cli, "--json", "status"])
        check_equal(status.rc, 0, f"status as uid {OTHER_UID}: {status}")
        check_equal(status.json["booted"]["version"], "1.0.0", "status as another user")
        busctl = ["busctl", f"--address={system_bus.address}"]
        slot = as_user(node, OTHER_UID, [*busctl, "get-property", "org.racklet.Update1", "/org/racklet/Update1",
                                         "org.racklet.Update1", "BootedSlot"])
        check_equal((slot.rc, slot.out.strip()), (0, 's "a"'), f"BootedSlot as uid {OTHER_UID}: {slot}")
        introspect = as_user(node, OTHER_UID, [*busctl, "introspect", "org.racklet.Update1", "/org/racklet/Update1"])
        check(introspect.rc == 0 and ".Apply" in introspect.out, f"introspection as uid {OTHER_UID}: {introspect}")
        # A check, then a second one within the minute: rate limited.
        checked = as_user(node, OTHER_UID, [cli, "--json", "check"])
        check_equal(checked.rc, 0, f"check as uid {OTHER_UID}: {checked}")
        check_equal(checked.json["result"], "available", "check as another user")
        again = as_user(node, OTHER_UID, [cli, "check"])
        check_equal(again.rc, 2, f"a second check as uid {OTHER_UID}: {again}")
        limited = re.search(r"^error: org\.racklet\.Update1\.Check: rate limited: a user other than root may ask "
                            r"for a check once every 60 s; try again in (\d+) s \(racklet-update status shows "
                            r"the last check\)$", again.err, re.M)
        check(limited and 1 <= int(limited.group(1)) <= 60, f"the rate limit's message: {again.err!r}")
        # Root is not limited.
        for _ in range(3):
            check_equal(node.ok("check").json["result"], "available", "root's repeated checks")
        # Changing the state: refused by the bus's policy (the daemon never sees the calls).
        refused_for_want_of_root(node, cli, OTHER_UID)
        call = as_user(node, OTHER_UID, [*busctl, "call", "org.racklet.Update1", "/org/racklet/Update1",
                                         "org.racklet.Update1", "MarkGood"])
        check(call.rc != 0 and "Access denied" in call.err, f"busctl call MarkGood as uid {OTHER_UID}: {call}")
        check("a state change by a user other than root" not in node.log_tail(200),
              "the daemon saw a state change the bus's policy should have refused")
        # RAUC's API: anyone reads; the daemon itself refuses a Mark by another user.
        check(shutil.which("rauc") is not None, RAUC_MISSING)
        rauc_env = ["env", "DBUS_STARTER_BUS_TYPE=session", f"DBUS_SESSION_BUS_ADDRESS={system_bus.address}"]
        rauc_status = as_user(node, OTHER_UID, [*rauc_env, "rauc", "status", "--output-format=json"])
        check(rauc_status.rc == 0 and rauc_status.json and rauc_status.json.get("booted") == "A",
              f"rauc status as uid {OTHER_UID}: {rauc_status}")
        rauc_mark = as_user(node, OTHER_UID, [*rauc_env, "rauc", "status", "mark-bad"])
        check(rauc_mark.rc != 0, f"rauc status mark-bad as uid {OTHER_UID} succeeded: {rauc_mark}")
        check_in(f"de.pengutronix.rauc.Installer.Mark: refused: changing the update state needs root (the caller "
                 f"is uid {OTHER_UID}; expected uid 0)", rauc_mark.out + rauc_mark.err, "rauc mark-bad as another user")
        node.stop()
        system_bus.close()
        buses.remove(system_bus)

        # A bus that lets anyone call anything: the daemon refuses by itself.
        open_bus = PrivateBus("open")
        buses.append(open_bus)
        node.extra_env["DBUS_SYSTEM_BUS_ADDRESS"] = open_bus.address
        node.start()
        refused_for_want_of_root(node, cli, OTHER_UID)
        call = as_user(node, OTHER_UID, ["busctl", f"--address={open_bus.address}", "call", "org.racklet.Update1",
                                         "/org/racklet/Update1", "org.racklet.Update1", "Apply", "sbb", "",
                                         "false", "false"])
        check(call.rc != 0, f"busctl call Apply as uid {OTHER_UID} succeeded: {call}")
        check_in(f"org.racklet.Update1.Apply: refused: changing the update state needs root (the caller is uid "
                 f"{OTHER_UID}; expected uid 0)", call.err, "the daemon's own refusal")
        check_in("refused: a state change by a user other than root", node.log_tail(200), "the daemon's log")
        # Reading and checking still work; root changes the state.
        check_equal(as_user(node, OTHER_UID, [cli, "check"]).rc, 0, f"check as uid {OTHER_UID} after a restart")
        check_equal(node.ok("apply").json.get("version"), "1.1.0", "root's apply")
        node.assert_installed(suite.builds["1.1.0"])
    finally:
        node.close()
        for bus in buses:
            bus.close()


@boot_loader_case
def update_found_and_installed(suite, node_name, boot_loader):
    node = standard_node(suite, node_name, boot_loader=boot_loader)
    new = suite.builds["1.1.0"]
    try:
        status = node.status()
        check_equal(status["booted"]["slot"], "a", "booted slot")
        check_equal(status["booted"]["version"], "1.0.0", "booted version")
        check_equal(status["booted"]["verity_root_hash"], suite.builds["1.0.0"].root_hash, "booted root hash")
        check_equal(status["state"]["operation"]["kind"], "idle", "operation before")
        check_equal({s["slot"]: s["state"] for s in status["boot_slots"]}, {"a": "good", "b": "empty"}, "slot states")
        node.check_boot("b-absent", "before the install")
        report = node.ok("check").json
        check_equal(report["result"], "available", "check result")
        check_equal(report["version"], "1.1.0", "check version")
        applied = node.ok("apply").json
        check_equal(applied.get("ok"), True, "apply --json ok")
        check_equal(applied.get("version"), "1.1.0", "apply version")
        node.assert_installed(new)
        status = node.status()
        check_equal(status["state"]["operation"], {"kind": "installed", "version": "1.1.0", "slot": "b"}, "operation")
        check_equal(status["state"]["slots"]["b"]["state"], "installed", "slot b record")
        check_equal(status["state"]["slots"]["b"]["verity_root_hash"], new.root_hash, "slot b record hash")
        check(status["state"]["last_error"] is None, f"last_error after a good install: {status['state']['last_error']}")
        check(not os.path.exists(node.marker), "rebooted without --reboot")
        # A second apply while one waits for its reboot is refused (exit 2).
        again = node.cli("apply")
        check_equal(again.rc, 2, f"apply while installed: {again}")
        check_in("cancel it first", again.out + again.err, "apply while installed")
        # Human output of status.
        human = run([UPDATE, "status"], env=dict(node.env(), RACKLET_LOG="warn")).stdout
        check_in("operation:   installed", human, "status (human)")
        # SLOT (6) BOOTED (8) NEXT BOOT (11) VERSION: "yes" in the third column.
        check(re.search(r"^b {15}yes {9}1\.1\.0", human, re.M) is not None,
              f"status (human) should mark slot B as booting next:\n{human}")
        # A restart keeps the installed update waiting for its reboot.
        node.restart()
        check_equal(node.status()["state"]["operation"]["kind"], "installed", "operation after a restart")
        node.assert_installed(new)
    finally:
        node.close()


@boot_loader_case
def installed_but_entry_lost_installs_again(suite, node_name, boot_loader):
    """A power cut lost the boot loader's try (loader.conf's new default, or
    U-Boot's newest state copy: vfat did not have it on the disk yet), so the
    machine came back in slot A: the agent must not wait for a reboot that
    would boot slot A again, but make B unbootable and install once more."""
    node = standard_node(suite, node_name, boot_loader=boot_loader)
    new = suite.builds["1.1.0"]
    try:
        node.ok("apply")
        node.assert_installed(new)
        node.stop()
        node.lose_last_boot_loader_write()
        node.reboot_into("a", suite.builds["1.0.0"])
        node.start()
        status = node.status()
        check_equal(status["state"]["operation"]["kind"], "idle", "operation after the restart")
        check_equal(status["state"]["slots"]["b"]["state"], "unbootable", "slot b record")
        check_in("would not try it", (status["state"]["last_error"] or {}).get("message", ""), "last_error")
        node.assert_b_unbootable()
        node.ok("apply")
        node.assert_installed(new)
    finally:
        node.close()


@boot_loader_case
def apply_with_reboot_writes_the_marker(suite, node_name, boot_loader):
    node = standard_node(suite, node_name, boot_loader=boot_loader)
    try:
        node.ok("apply", "--reboot")
        node.assert_installed(suite.builds["1.1.0"])
        wait_until(lambda: os.path.exists(node.marker), 10, "the reboot marker")
    finally:
        node.close()


def utc_window(offset_minutes, length_minutes):
    """A maintenance window `HH:MM-HH:MM` starting `offset_minutes` from now (UTC)."""
    now = time.gmtime()
    start = (now.tm_hour * 60 + now.tm_min + offset_minutes) % 1440
    end = (start + length_minutes) % 1440
    return f"{start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d}"


@boot_loader_case
def maintenance_window_defers_the_automatic_reboot(suite, node_name, boot_loader):
    """auto_apply and auto_reboot with the maintenance window closed: the
    timer installs the update at once and leaves the reboot for the window
    (status says when it opens); once the window is open, the timer reboots
    into the update without being asked."""
    node = standard_node(suite, node_name, boot_loader=boot_loader, start=False)
    closed = utc_window(120, 60)
    node.write_config(f'maintenance_window = "{closed}"\n', automatic=True)
    try:
        node.start(timer=True)
        wait_until(lambda: node.status()["state"]["operation"]["kind"] == "installed", 60,
                   "the timer's automatic install")
        node.assert_installed(suite.builds["1.1.0"])
        status = node.status()
        at = status.get("automatic_reboot_at") or ""
        check(at.endswith("Z") and at[11:16] == closed[:5],
              f"automatic_reboot_at {at!r}, expected the opening of {closed}")
        human = run([UPDATE, "status"], env=dict(node.env(), RACKLET_LOG="warn")).stdout
        check_in(f"reboot:      by itself at {at}", human, "status (human)")
        time.sleep(2)
        check(not os.path.exists(node.marker), f"rebooted outside the maintenance window {closed}")
        # The window opens (here: a window around now, and a restart).
        node.stop()
        node.write_config(f'maintenance_window = "{utc_window(-30, 60)}"\n', automatic=True)
        node.start(timer=True)
        wait_until(lambda: os.path.exists(node.marker), 15, "the reboot once the window is open")
        with open(node.marker) as marker:
            check_in("maintenance window", marker.read(), "the reboot's reason")
    finally:
        node.close()


@case
def up_to_date(suite, node_name):
    node = standard_node(suite, node_name, versions=("1.0.0",))
    try:
        report = node.ok("check").json
        check_equal(report["result"], "up-to-date", "check result")
        check(report["version"] is None, f"version offered: {report}")
        apply = node.cli("apply")
        check_equal(apply.rc, 2, f"apply when up to date: {apply}")
        check_in("up to date", apply.out + apply.err, "apply refusal")
        state = node.status()["state"]
        check_equal(state["last_check"]["available_version"], None, "last_check")
        # The refused apply is in the status, not only on the CLI's stderr.
        check_equal((state["last_error"] or {}).get("operation"), "apply", f"last_error {state['last_error']}")
        check_in("up to date", (state["last_error"] or {}).get("message", ""), "last_error of the refused apply")
        node.assert_b_unbootable()
    finally:
        node.close()


@case
def not_yet_waves_in_the_future(suite, node_name):
    node = Node(suite, node_name)
    try:
        node.publish("1.0.0")
        node.publish("1.1.0", "--wave", "1024@+1d", "--wave", "2048@+2d")
        node.start()
        report = node.ok("check").json
        check_equal(report["result"], "not-yet", "check result")
        check_equal(report["version"], "1.1.0", "check version")
        check(report["wave_start"], f"no wave_start: {report}")
        start = report["wave_start"]
        seed = report["seed"]
        check(0 <= seed < 2048, f"seed {seed}")
        check_in(start, report["message"], "message names the start")
        apply = node.cli("apply")
        check_equal(apply.rc, 2, f"apply before the wave: {apply}")
        check_in("rolling out", apply.out + apply.err, "apply refusal")
        human = run([UPDATE, "check"], env=dict(node.env(), RACKLET_LOG="warn")).stdout
        check_in("may start at", human, "check (human)")
        node.assert_b_unbootable()
    finally:
        node.close()


@case
def ignore_waves_takes_it_now(suite, node_name):
    node = Node(suite, node_name, config="ignore_waves = true")
    try:
        node.publish("1.0.0")
        node.publish("1.1.0", "--wave", "2048@+2d")
        node.start()
        check_equal(node.ok("check").json["result"], "available", "check with ignore_waves")
    finally:
        node.close()


@case
def pinned_version_lock(suite, node_name):
    node = standard_node(suite, node_name, versions=("1.0.0", "1.1.0", "1.2.0"), config='version_lock = "1.1.0"')
    try:
        report = node.ok("check").json
        check_equal((report["result"], report["version"]), ("available", "1.1.0"), "check with version_lock")
        node.ok("apply")
        node.assert_installed(suite.builds["1.1.0"])
    finally:
        node.close()


@case
def ceiling_set_max_version(suite, node_name):
    node = standard_node(suite, node_name, versions=("1.0.0", "1.1.0", "1.2.0"), start=False)
    try:
        node.repo_command("set-max-version", "--variant", VARIANT, "--max-version", "1.1.0")
        node.start()
        report = node.ok("check").json
        check_equal((report["result"], report["version"]), ("available", "1.1.0"), "check under a ceiling")
        node.ok("apply")
        node.assert_installed(suite.builds["1.1.0"])
    finally:
        node.close()


@case
def explicit_version_and_downgrade_refusal(suite, node_name):
    node = standard_node(suite, node_name, versions=("1.0.0", "1.1.0", "1.2.0"))
    try:
        same = node.cli("apply", "--version", "1.0.0")
        check_equal(same.rc, 2, f"apply --version 1.0.0 (running): {same}")
        check_in("already running", same.out + same.err, "refusal")
        missing = node.cli("apply", "--version", "9.9.9")
        check_equal(missing.rc, 2, f"apply --version 9.9.9: {missing}")
        check_in("not published", missing.out + missing.err, "refusal")
        node.ok("apply", "--version", "1.1.0")
        node.assert_installed(suite.builds["1.1.0"])
    finally:
        node.close()


def flip_bit(path, offset):
    """A published target tampered with: one bit flipped, the file replaced."""
    data = bytearray(open(path, "rb").read())
    data[offset] ^= 0x01
    with open(path + ".tmp", "wb") as out:
        out.write(data)
    os.replace(path + ".tmp", path)


def failed_install(node, new, expected_words):
    apply = node.cli("apply")
    check(apply.rc != 0, f"apply succeeded: {apply}")
    status = node.status()
    error = status["state"]["last_error"]
    check(error is not None, "no last_error after a failed install")
    for words in expected_words:
        if isinstance(words, str):
            words = (words,)
        check(any(word.lower() in error["message"].lower() for word in words),
              f"last_error {error['message']!r} does not say any of {words}")
    check_equal(status["state"]["operation"]["kind"], "idle", "operation after a failed install")
    check_equal(status["state"]["slots"]["b"]["state"], "unbootable", "slot b record")
    check(apply.json and apply.json.get("ok") is False, f"apply --json: {apply.out!r}")
    node.assert_b_unbootable(new)
    return error


@boot_loader_case
def tampered_target_is_refused(suite, node_name, boot_loader):
    node = standard_node(suite, node_name, start=False, boot_loader=boot_loader)
    new = suite.builds["1.1.0"]
    try:
        path = node.target_path(new, "root.erofs.zst")
        flip_bit(path, os.path.getsize(path) // 2)
        node.start()
        check_equal(node.ok("check").json["result"], "available", "check (metadata is intact)")
        failed_install(node, new, ["root.erofs.zst", ("sha256", "hash", "match")])
    finally:
        node.close()


@boot_loader_case
def tampered_uki_is_refused(suite, node_name, boot_loader):
    node = standard_node(suite, node_name, start=False, boot_loader=boot_loader)
    new = suite.builds["1.1.0"]
    try:
        path = node.target_path(new, "uki-b.efi.zst")
        flip_bit(path, 100)
        node.start()
        # Root and verity verified before the UKI is fetched, so slot B may keep the
        # new root hash's PARTUUIDs; without a UKI nothing boots it.
        # Refused on the shipped bytes' sha256, before any decompression.
        failed_install(node, None, ["uki-b.efi.zst", ("sha256", "hash", "match")])
    finally:
        node.close()


@case
def truncated_target_is_refused(suite, node_name):
    node = standard_node(suite, node_name)
    new = suite.builds["1.1.0"]
    try:
        suite.server.set_rule(new.target_name("root.erofs.zst"), mode="truncate")
        failed_install(node, new, ["root.erofs.zst"])
    finally:
        node.close()


@case
def over_long_target_is_refused(suite, node_name):
    node = standard_node(suite, node_name)
    new = suite.builds["1.1.0"]
    try:
        suite.server.set_rule(new.target_name("verity.img.zst"), mode="extra", bytes=65536)
        failed_install(node, new, ["verity.img.zst"])
    finally:
        node.close()


@case
def server_gone_mid_download_fails_cleanly(suite, node_name):
    node = standard_node(suite, node_name)
    new = suite.builds["1.1.0"]
    try:
        suite.server.set_rule(new.target_name("root.erofs.zst"), mode="gone")
        failed_install(node, new, ["root.erofs.zst"])
    finally:
        node.close()


@case
def one_dropped_connection_is_resumed(suite, node_name):
    node = standard_node(suite, node_name)
    new = suite.builds["1.1.0"]
    try:
        name = new.target_name("root.erofs.zst")
        suite.server.set_rule(name, mode="drop", count=1)
        node.ok("apply")
        node.assert_installed(new)
        requests = [r for r in suite.server.requests if name in r[0]]
        check(len(requests) >= 2, f"expected a retry of {name}: {requests}")
    finally:
        node.close()


@case
def throttled_download_cut_three_times_goes_on_where_it_stopped(suite, node_name):
    node = standard_node(suite, node_name)
    new = suite.builds["1.1.0"]
    try:
        name = new.target_name("root.erofs.zst")
        size = os.path.getsize(node.target_path(new, "root.erofs.zst"))
        suite.server.set_rule(name, mode="drop", count=3, rate=4 * MIB)
        node.ok("apply")
        node.assert_installed(new)
        ranges = [r[1] for r in suite.server.requests if name in r[0]]
        check(len(ranges) == 4 and ranges[0] is None and all(r and r.startswith("bytes=") for r in ranges[1:]),
              f"expected one request and three range requests for {name}: {ranges}")
        served = sum(count for path, count in suite.server.served.items() if name in path)
        check(served < 1.5 * size, f"served {served} bytes of a {size}-byte artifact (resumed downloads send each byte once)")
        check(node.status()["progress"]["resumed"] >= 3, f"status progress: {node.status()['progress']}")
    finally:
        node.close()


@case
def stalled_download_is_resumed_with_a_range_request(suite, node_name):
    node = Node(suite, node_name, http_timeout=2)
    new = suite.builds["1.1.0"]
    try:
        node.publish("1.0.0")
        node.publish("1.1.0")
        node.start()
        name = new.target_name("root.erofs.zst")
        suite.server.set_rule(name, mode="stall", seconds=4, count=1)
        node.ok("apply")
        node.assert_installed(new)
        ranges = [r[1] for r in suite.server.requests if name in r[0]]
        check(len(ranges) >= 2 and ranges[0] is None and ranges[-1] and ranges[-1].startswith("bytes="),
              f"expected a retry with a Range header: {ranges}")
    finally:
        node.close()


@case
def expired_metadata_is_refused(suite, node_name):
    node = Node(suite, node_name)
    try:
        # Published 10 days ago: the timestamp (7 days) has expired.
        node.publish("1.0.0", faketime="-10d")
        node.publish("1.1.0", faketime="-10d")
        node.start()
        result = node.cli("check")
        check(result.rc != 0, f"check with expired metadata succeeded: {result}")
        check_in("expired", result.out + result.err, "check error")
        status = node.status()
        check_in("expired", status["state"]["last_error"]["message"], "last_error")
        check_in("expired", status["state"]["last_check"]["result"], "last_check")
        apply = node.cli("apply")
        check(apply.rc != 0, f"apply with expired metadata succeeded: {apply}")
        node.assert_b_unbootable()
        # Re-signed in time: fine again.
        node.repo_command("refresh")
        check_equal(node.ok("check").json["result"], "available", "check after a refresh")
    finally:
        node.close()


def faketime_library():
    """libfaketime for a multithreaded program (Debian's libfaketime)."""
    for directory in glob.glob("/usr/lib/*/faketime"):
        path = os.path.join(directory, "libfaketimeMT.so.1")
        if os.path.exists(path):
            return path
    raise TestFailure("libfaketimeMT.so.1 not found (apt-get install libfaketime)")


@case
def a_clock_a_year_ahead_and_back_heals_by_itself(suite, node_name):
    """One wrong clock (a spoofed NTP answer a year ahead) must not lock the
    node out: the check fails while the clock is wrong, nothing of that time
    is kept, and once the clock is right the node updates without a person.
    A latest known time from the future left by an older agent is forgotten."""
    node = standard_node(suite, node_name, start=False)
    try:
        offset = os.path.join(node.dir, "faketime-offset")
        with open(offset, "w") as out:
            out.write("+0d\n")
        node.extra_env = {
            "LD_PRELOAD": faketime_library(),
            "FAKETIME_TIMESTAMP_FILE": offset,
            "FAKETIME_NO_CACHE": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        }
        node.start()
        check_equal(node.ok("check").json["result"], "available", "check on the right clock")
        known_time = os.path.join(node.tuf_dir, "latest_known_time.json")
        before = read_or_none(known_time)
        with open(offset, "w") as out:
            out.write("+365d\n")
        ahead = node.cli("check")
        check(ahead.rc != 0, f"check a year ahead succeeded: {ahead}")
        check_in("expired", ahead.out + ahead.err, "check a year ahead")
        check_equal(read_or_none(known_time), before,
                    "latest_known_time.json after a failed check a year ahead (kept only with verified metadata)")
        with open(offset, "w") as out:
            out.write("+0d\n")
        check_equal(node.ok("check").json["result"], "available", "check with the clock back")
        # What an older agent (tough writing in place) left behind.
        next_year = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 365 * 86400))
        with open(known_time, "w") as out:
            out.write(json.dumps(next_year))
        check_equal(node.ok("check").json["result"], "available", "check after a latest known time a year ahead")
        check_in("forgot a latest known time", node.log_tail(80), "daemon log")
        kept = json.loads(read_or_none(known_time))
        check(kept < next_year, f"latest_known_time.json still a year ahead: {kept}")
        applied = node.ok("apply").json
        check_equal(applied.get("version"), "1.1.0", "apply once the clock is right")
        node.assert_installed(suite.builds["1.1.0"])
    finally:
        node.close()


@case
def replayed_timestamp_is_refused_across_restarts(suite, node_name):
    node = standard_node(suite, node_name)
    try:
        timestamp = os.path.join(node.repo, "metadata", "timestamp.json")
        old = open(timestamp, "rb").read()
        old_version = json.loads(old)["signed"]["version"]
        node.repo_command("refresh")
        new = open(timestamp, "rb").read()
        new_version = json.loads(new)["signed"]["version"]
        check(new_version > old_version, f"refresh did not bump the timestamp ({old_version} -> {new_version})")
        check_equal(node.ok("check").json["result"], "available", "check of the new metadata")
        check(os.path.exists(os.path.join(node.tuf_dir, "timestamp.json")), "no timestamp.json in the datastore")
        node.restart()
        with open(timestamp + ".tmp", "wb") as out:
            out.write(old)
        os.replace(timestamp + ".tmp", timestamp)
        result = node.cli("check")
        check(result.rc != 0, f"check of a replayed timestamp succeeded: {result}")
        check_in("rollback", result.out + result.err, "check error")
        check_in("timestamp", result.out + result.err, "check error")
        apply = node.cli("apply")
        check(apply.rc != 0, f"apply with a replayed timestamp succeeded: {apply}")
        node.assert_b_unbootable()
        with open(timestamp + ".tmp", "wb") as out:
            out.write(new)
        os.replace(timestamp + ".tmp", timestamp)
        check_equal(node.ok("check").json["result"], "available", "check once the repository is current again")
    finally:
        node.close()


@boot_loader_case
def interrupted_write_then_retry(suite, node_name, boot_loader):
    node = standard_node(suite, node_name, boot_loader=boot_loader)
    new = suite.builds["1.1.0"]
    try:
        # ~4 MiB at 1 MiB/s: the daemon is mid-write for a few seconds.
        throttle_root(suite, new)
        started = node.ok("apply", "--no-wait").json
        check_equal(started.get("version"), "1.1.0", f"apply --no-wait: {started}")

        def mid_write():
            status = node.status()
            return (status["state"]["operation"]["kind"] == "writing"
                    and 0 < status["progress"]["bytes"] < status["progress"]["total"])
        wait_until(mid_write, 15, "the write to be under way", interval=0.05)
        time.sleep(0.3)
        node.kill()
        suite.server.clear_rules()
        # A kill -9 mid-write: nothing in slot B may be bootable.
        node.assert_b_unbootable(new)
        node.start()
        status = node.status()
        error = status["state"]["last_error"]
        check(error is not None, "no last_error after an interrupted install")
        check_in("interrupted", error["message"], "last_error")
        check_equal(error["operation"], "writing", "last_error operation")
        check_equal(status["state"]["operation"]["kind"], "idle", "operation after the restart")
        check_equal(status["state"]["slots"]["b"]["state"], "unbootable", "slot b record")
        node.assert_b_unbootable(new)
        node.ok("apply")
        node.assert_installed(new)
        check(node.status()["state"]["last_error"] is None, "last_error kept after a good install")
    finally:
        node.close()


@boot_loader_case
def cancel_while_writing(suite, node_name, boot_loader):
    node = standard_node(suite, node_name, boot_loader=boot_loader)
    new = suite.builds["1.1.0"]
    try:
        throttle_root(suite, new)
        node.ok("apply", "--no-wait")
        wait_until(lambda: node.status()["progress"]["bytes"] > 0, 15, "the write to start", interval=0.05)
        cancel = node.ok("cancel").json
        check_in("cancelling", cancel["message"], "cancel message")
        try:
            wait_until(lambda: node.status()["state"]["operation"]["kind"] == "idle", 8, "the install to stop")
        except TestFailure as error:
            cpu = cpu_seconds(node.daemon.pid, 2.0)
            node.kill()
            raise TestFailure(f"{error}; the daemon used {cpu:.1f} s of CPU in the next 2 s "
                              "(a busy loop?)") from None
        suite.server.clear_rules()
        status = node.status()
        check_equal(status["state"]["slots"]["b"]["state"], "unbootable", "slot b record")
        check_in("cancelled", (status["state"]["last_error"] or {}).get("message", ""), "last_error")
        node.assert_b_unbootable(new)
    finally:
        node.close()


@boot_loader_case
def sigterm_during_write_stops_promptly(suite, node_name, boot_loader):
    node = standard_node(suite, node_name, boot_loader=boot_loader)
    new = suite.builds["1.1.0"]
    try:
        throttle_root(suite, new)
        node.ok("apply", "--no-wait")
        wait_until(lambda: node.status()["progress"]["bytes"] > 0, 15, "the write to start", interval=0.05)
        node.daemon.send_signal(signal.SIGTERM)
        try:
            node.daemon.wait(5)
        except subprocess.TimeoutExpired:
            cpu = cpu_seconds(node.daemon.pid, 1.0)
            node.kill()
            raise TestFailure(f"the daemon did not exit within 5 s of SIGTERM during a write "
                              f"(it used {cpu:.1f} s of CPU in the next second)") from None
        node.daemon = None
        suite.server.clear_rules()
        node.assert_b_unbootable(new)
        node.start()
        error = node.status()["state"]["last_error"]
        # Stopped cleanly ("cancelled") or cut off ("interrupted"): either way recorded.
        check(error is not None and ("interrupted" in error["message"] or "cancelled" in error["message"]),
              f"last_error after the restart: {error}")
        node.ok("apply")
        node.assert_installed(new)
    finally:
        node.close()


@boot_loader_case
def cancel_installed_update(suite, node_name, boot_loader):
    node = standard_node(suite, node_name, boot_loader=boot_loader)
    new = suite.builds["1.1.0"]
    try:
        node.ok("apply")
        node.assert_installed(new)
        message = node.ok("cancel").json["message"]
        check_in("cancelled 1.1.0", message, "cancel message")
        status = node.status()
        check_equal(status["state"]["operation"]["kind"], "idle", "operation after cancel")
        check_equal(status["state"]["slots"]["b"]["state"], "unbootable", "slot b record")
        node.assert_b_unbootable()
        check_equal(node.ok("cancel").json["message"], "nothing to cancel", "second cancel")
        # It can be applied again.
        node.ok("apply")
        node.assert_installed(new)
    finally:
        node.close()


def throttle_root(suite, build):
    """The root's first 4.5 MiB at once (the agent writes its first 4 MiB
    buffer), the rest at 256 KiB/s: several seconds mid-write."""
    suite.server.set_rule(build.target_name("root.erofs.zst"), mode="throttle",
                          fast=4 * MIB + MIB // 2, rate=256 * 1024)


def cpu_seconds(pid, interval):
    """CPU time (user + system) a process uses during `interval` seconds."""
    def ticks():
        with open(f"/proc/{pid}/stat") as source:
            fields = source.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    before = ticks()
    time.sleep(interval)
    return (ticks() - before) / os.sysconf("SC_CLK_TCK")


def install_and_boot_into_b(node, new):
    node.ok("apply")
    node.assert_installed(new)
    node.reboot_into("b", new)
    node.start()


def install_boot_and_commit_b(node, new):
    """Install `new`, boot B, and wait for a passing health gate to commit it.
    Returns the status then."""
    node.add_check("10-ok.sh", "echo all good; exit 0")
    install_and_boot_into_b(node, new)

    def committed():
        status = node.status()
        return status["state"]["slots"]["b"]["state"] == "good" and status
    return wait_until(committed, 20, "the health gate to commit slot b")


def add_slow_check(node, exit_code):
    """A health check that runs until the returned file exists (30 s at most),
    then exits `exit_code`: the gate is still running while the test acts."""
    release = os.path.join(node.dir, "release")
    node.add_check("10-slow.sh", f"i=0; while [ ! -e {release} ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; "
                                 f"exit {exit_code}")
    return release


def fall_back_to_a(node):
    """The machine restarts after B's try was used (the daemon is stopped or
    killed): the boot loader falls back to A, where the agent marks B bad.
    Returns the status then."""
    node.reboot_into("a", node.suite.builds["1.0.0"])
    node.check_boot("b-tried", "after the fallback, before the agent ran")
    node.start()
    node.check_boot("b-bad", "after the fallback")
    return node.status()


def check_retried_once(node, status):
    """After B's first failed try: nothing recorded as failed, and the same
    version is offered once more."""
    check_equal(status["state"]["operation"]["kind"], "idle", "operation after the first fallback")
    check_equal(status["state"]["slots"]["b"]["state"], "unbootable", "slot b record after the first fallback")
    check_equal(status["state"]["failed_versions"], [], "failed versions after the first fallback")
    check_in("did not come up", (status["state"]["last_error"] or {}).get("message", ""), "last_error")
    report = node.ok("check").json
    check_equal((report["result"], report["version"]), ("available", "1.1.0"),
                "check after one fallback (retried once)")


@case
def https_repository_trusted_through_a_private_ca(suite, node_name):
    """The repository over HTTPS with a certificate from a throwaway CA made at
    the suite's start. Trusting another CA only, the check fails at once (a
    certificate that does not verify is not asked for again) and says why
    (UnknownIssuer); an extra_ca_certificates file without a certificate is
    named in the error; the CA in the system's trust store (SSL_CERT_FILE, as
    the image's bundle plus a card's [trust]) is trusted; given the CA through
    the configuration's extra_ca_certificates, the update installs over HTTPS.
    A user and password in the URL are sent, never shown."""
    node = standard_node(suite, node_name, start=False)
    new = suite.builds["1.1.0"]
    other_ca = os.path.join(node.dir, "other-ca.pem")
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-subj", "/CN=racklet-agent-test-other-ca", "-days", "1",
         "-keyout", os.path.join(node.dir, "other-ca.key"), "-out", other_ca])
    not_a_certificate = os.path.join(node.dir, "not-a-certificate.pem")
    shutil.copyfile(os.path.join(node.dir, "other-ca.key"), not_a_certificate)
    with_credentials = suite.tls_url.replace("https://", "https://racklet:s3cret@")
    try:
        node.write_config(base=with_credentials)
        node.extra_env = {"SSL_CERT_FILE": other_ca}
        node.start()
        started = time.monotonic()
        refused = node.cli("check")
        elapsed = time.monotonic() - started
        said = refused.out + refused.err
        check(refused.rc != 0, f"a check against an untrusted certificate succeeded: {refused}")
        check("UnknownIssuer" in said and "TLS" in said,
              f"the refusal does not say it is the certificate: {refused}")
        check(elapsed < 3.0, f"an untrusted certificate was asked for again ({elapsed:.1f} s)")
        status = node.status()
        shown = json.dumps(status) + said + node.ok("status").out
        check("s3cret" not in shown, f"the URL's password is shown: {shown}")
        node.stop()

        node.write_config(base=with_credentials, extra=f'extra_ca_certificates = "{not_a_certificate}"')
        node.start()
        refused = node.cli("check")
        said = refused.out + refused.err
        check(refused.rc != 0 and not_a_certificate in said and "extra_ca_certificates" in said
              and "no certificate in it" in said,
              f"the error does not name the file without a certificate: {refused}")
        node.stop()

        node.write_config(base=suite.tls_url)
        node.extra_env = {"SSL_CERT_FILE": suite.test_ca}
        node.start()
        check_equal(node.ok("check").json["result"], "available", "check over HTTPS (system trust store)")
        node.stop()

        node.write_config(base=with_credentials, extra=f'extra_ca_certificates = "{suite.test_ca}"')
        node.extra_env = {"SSL_CERT_FILE": other_ca}
        node.start()
        check_equal(node.ok("check").json["result"], "available", "check over HTTPS (extra_ca_certificates)")
        node.ok("apply")
        node.assert_installed(new)
        served = [path for path, _ in suite.tls_server.requests]
        check(any(path.endswith("root.erofs.zst") for path in served),
              f"the root was not fetched over HTTPS: {served[:8]}")
        check_equal([path for path, _ in suite.server.requests], [], "requests to the plain HTTP server")
        check("s3cret" not in json.dumps(node.status()), "the URL's password is in the status")
    finally:
        node.close()


@case
def plain_http_to_another_machine_is_refused(suite, node_name):
    """A repository URL of plain http:// to another machine (as the QEMU
    variants' 10.0.2.100): the configuration is refused (the status names the
    file, the key, the URL without its password, and allow_insecure_http), and
    the agent runs on the image's defaults, never on the refused URL;
    allow_insecure_http = true accepts it."""
    node = standard_node(suite, node_name, start=False)
    try:
        node.write_config(base="http://racklet:s3cret@10.0.2.100")
        node.start()
        status = node.status()
        error = status.get("config_error") or ""
        check(node.config in error and "metadata_url" in error
              and "http://***@10.0.2.100/metadata/" in error
              and "allow_insecure_http = true" in error and "s3cret" not in error,
              f"config_error: {error!r}")
        refused = node.cli("check")
        check(refused.rc != 0 and "10.0.2.100" not in refused.out + refused.err,
              f"a check with the refused configuration: {refused}")
        node.stop()
        node.write_config(base="http://10.0.2.100", extra="allow_insecure_http = true")
        node.start()
        check(node.status().get("config_error") is None, "allow_insecure_http = true was not accepted")
    finally:
        node.close()


@boot_loader_case
def unusable_state_is_set_aside_and_an_update_still_completes(suite, node_name, boot_loader):
    """state.json replaced with garbage, then with a future schema: the agent
    starts anyway, keeps the file aside, says so (status, last error, the
    human status), rebuilds the slots from the boot loader, and an update
    installs, boots and commits."""
    node = standard_node(suite, node_name, boot_loader=boot_loader)
    new = suite.builds["1.1.0"]
    try:
        state_file = os.path.join(node.state_dir, "state.json")
        check(os.path.exists(state_file), "no state.json after the first start")
        for contents, reason in [(b"\x00garbage{", "not a valid agent state file"),
                                 (b'{"schema": 99, "slots": {}}', "agent state schema 99 is not supported")]:
            node.stop()
            with open(state_file, "wb") as out:
                out.write(contents)
            node.start()
            status = node.status()
            aside = status.get("state_set_aside") or {}
            check_in(reason, aside.get("reason", ""), "state_set_aside.reason")
            kept = aside.get("kept_as") or ""
            check(os.path.basename(kept).startswith("state.json.set-aside-") and os.path.exists(kept),
                  f"the unusable file was not kept aside: {aside}")
            with open(kept, "rb") as source:
                check_equal(source.read(), contents, "the set-aside file's bytes")
            check_in("kept aside", (status["state"]["last_error"] or {}).get("message", ""), "last_error")
            check_equal({s["slot"]: s["state"] for s in status["boot_slots"]}, {"a": "good", "b": "empty"},
                        "slot states rebuilt from the boot loader")
            human = run([UPDATE, "status"], env=dict(node.env(), RACKLET_LOG="warn")).stdout
            check_in("state:       rebuilt at the start", human, "status (human)")
        status = install_boot_and_commit_b(node, new)
        check_equal((status["booted"]["slot"], status["booted"]["version"]), ("b", "1.1.0"), "booted")
        check(status.get("state_set_aside") is None, f"a good state file reported as set aside: {status}")
        node.check_boot("b-good", "after the health gate passed", uki_b=new.uki_b)
    finally:
        node.close()


@boot_loader_case
def health_gate_passes_and_commits(suite, node_name, boot_loader):
    node = standard_node(suite, node_name, boot_loader=boot_loader)
    new = suite.builds["1.1.0"]
    try:
        status = install_boot_and_commit_b(node, new)
        check_equal(status["booted"]["slot"], "b", "booted slot")
        check_equal(status["booted"]["version"], "1.1.0", "booted version")
        check_equal(status["state"]["operation"]["kind"], "idle", "operation")
        check_equal(status["state"]["slots"]["b"]["version"], "1.1.0", "slot b version")
        node.check_boot("b-good", "after the health gate passed", uki_b=new.uki_b)
        check(not os.path.exists(node.marker), "rebooted after a passing gate")
        check_equal(status["state"]["failed_versions"], [], "failed versions")
        node.assert_slot_a_untouched()
        # Nothing newer: up to date on the new version.
        check_equal(node.ok("check").json["result"], "up-to-date", "check on 1.1.0")
        # The committed slot boots again, and that boot is no try.
        node.reboot_into("b", new)
        node.check_boot("b-good", "after the next reboot", uki_b=new.uki_b)
        node.start()
        status = node.status()
        check_equal((status["booted"]["slot"], status["state"]["operation"]["kind"]), ("b", "idle"),
                    "booted slot and operation after the next reboot")
        node.check_boot("b-good", "after the next reboot, with the daemon")
    finally:
        node.close()


@boot_loader_case
def health_gate_fails_marks_bad_and_is_not_offered_again(suite, node_name, boot_loader):
    node = standard_node(suite, node_name, boot_loader=boot_loader)
    new = suite.builds["1.1.0"]
    old = suite.builds["1.0.0"]
    try:
        node.add_check("10-ok.sh", "exit 0")
        node.add_check("20-broken.sh", "echo 'the frobnicator is broken' >&2; exit 3")
        install_and_boot_into_b(node, new)
        wait_until(lambda: os.path.exists(node.marker), 20, "the reboot marker")
        status = node.status()
        check_equal(status["state"]["slots"]["b"]["state"], "bad", "slot b record")
        node.check_boot("b-bad", "after the failed health gate")
        failed = status["state"]["failed_versions"]
        check_equal([entry["version"] for entry in failed], ["1.1.0"], "failed versions")
        check_in("20-broken.sh", failed[0]["reason"], "failure reason")
        # The boot loader boots slot A again.
        node.reboot_into("a", old)
        node.start()
        status = node.status()
        check_equal(status["booted"]["slot"], "a", "booted slot after the fallback")
        check_equal(status["state"]["slots"]["b"]["state"], "bad", "slot b record after the fallback")
        report = node.ok("check").json
        check_equal(report["result"], "up-to-date", "check after the failed version")
        check(report["version"] is None, f"the failed version is offered again: {report}")
        apply = node.cli("apply")
        check_equal(apply.rc, 2, f"automatic apply of a failed version: {apply}")
        node.assert_slot_a_untouched()
    finally:
        node.close()


@boot_loader_case
def health_gate_required_unit_without_systemd_fails(suite, node_name, boot_loader):
    """No systemd answers on this bus: a required unit can never be seen active."""
    node = standard_node(suite, node_name,
                         health='timeout_seconds = 2\nrequired_units = ["containerd.service"]\n',
                         boot_loader=boot_loader)
    new = suite.builds["1.1.0"]
    try:
        install_and_boot_into_b(node, new)
        wait_until(lambda: os.path.exists(node.marker), 20, "the reboot marker")
        status = node.status()
        check_equal(status["state"]["slots"]["b"]["state"], "bad", "slot b record")
        failed = status["state"]["failed_versions"]
        check_equal([entry["version"] for entry in failed], ["1.1.0"], "failed versions")
        check_in("containerd.service", failed[0]["reason"], "failure reason")
        node.check_boot("b-bad", "after the failed health gate")
    finally:
        node.close()


@boot_loader_case
def try_that_never_came_up_is_retried_once_then_marked_bad(suite, node_name, boot_loader):
    """The try boot died before the agent ran (the boot loader fell back to A):
    once may be a power cut, so the version is installed once more; the second
    time it counts as failed and is not offered again."""
    node = standard_node(suite, node_name, boot_loader=boot_loader)
    new = suite.builds["1.1.0"]

    def fall_back():
        node.stop()
        check_equal(node.start_boot_loader(), "b", "the slot the try boot started")  # and died
        return fall_back_to_a(node)

    try:
        node.ok("apply")
        node.assert_installed(new)
        check_retried_once(node, fall_back())
        node.ok("apply")
        node.assert_installed(new)
        status = fall_back()
        check_equal(status["state"]["slots"]["b"]["state"], "bad", "slot b record after the second fallback")
        check_equal([entry["version"] for entry in status["state"]["failed_versions"]], ["1.1.0"],
                    "failed versions after the second fallback")
        check_equal(node.ok("check").json["result"], "up-to-date", "check after the failed version")
        node.assert_slot_a_untouched()
    finally:
        node.close()


@boot_loader_case
def power_cut_during_the_health_gate_falls_back(suite, node_name, boot_loader):
    """The try came up, but the power went while its health gate ran: the
    boot loader falls back to A (the try is used, nothing committed), and the
    agent there counts it like a try that did not come up: once more."""
    node = standard_node(suite, node_name, boot_loader=boot_loader)
    new = suite.builds["1.1.0"]
    release = add_slow_check(node, 0)
    try:
        install_and_boot_into_b(node, new)
        check_equal(node.status()["state"]["operation"]["kind"], "trying", "operation during the try")
        node.kill()
        check_retried_once(node, fall_back_to_a(node))
        node.assert_slot_a_untouched()
    finally:
        open(release, "w").close()  # the killed daemon's check script
        node.close()


@boot_loader_case
def rollback_and_manual_marks(suite, node_name, boot_loader):
    node = standard_node(suite, node_name, boot_loader=boot_loader)
    new = suite.builds["1.1.0"]
    try:
        node.add_check("10-ok.sh", "exit 0")
        install_and_boot_into_b(node, new)
        wait_until(lambda: node.status()["state"]["slots"]["b"]["state"] == "good", 20, "the commit of slot b")
        # mark-good on a committed slot changes nothing.
        message = node.ok("mark-good").json["message"]
        check_in("already committed", message, "mark-good message")
        node.check_boot("b-good", "after mark-good of a committed slot", uki_b=new.uki_b)
        # rollback: A boots next.
        message = node.ok("rollback").json["message"]
        check_in("slot a (1.0.0) boots next", message, "rollback message")
        node.check_boot("a-good", "after rollback", uki_b=new.uki_b)
        check(not os.path.exists(node.marker), "rollback without --reboot rebooted")
        # mark-bad by hand on the booted (committed) B: A is good, so it is allowed.
        message = node.ok("mark-bad", "--reason", "operator says no").json["message"]
        check_in("marked bad", message, "mark-bad message")
        status = node.status()
        check_equal(status["state"]["slots"]["b"]["state"], "bad", "slot b record")
        check_equal([(f["version"], f["reason"]) for f in status["state"]["failed_versions"]],
                    [("1.1.0", "operator says no")], "failed versions")
        node.check_boot("b-bad", "after mark-bad of the committed slot")
        # Rolling back to a bad slot is refused from A.
        node.reboot_into("a", suite.builds["1.0.0"])
        node.start()
        refused = node.cli("rollback")
        check_equal(refused.rc, 2, f"rollback to a bad slot: {refused}")
        # mark-bad of the only good slot is refused.
        refused = node.cli("mark-bad")
        check_equal(refused.rc, 2, f"mark-bad of the only good slot: {refused}")
        node.check_boot("b-bad", "after the refused rollback and mark-bad")
        node.assert_slot_a_untouched()
    finally:
        node.close()


@boot_loader_case
def rollback_with_reboot(suite, node_name, boot_loader):
    node = standard_node(suite, node_name, boot_loader=boot_loader)
    new = suite.builds["1.1.0"]
    try:
        node.add_check("10-ok.sh", "exit 0")
        install_and_boot_into_b(node, new)
        wait_until(lambda: node.status()["state"]["slots"]["b"]["state"] == "good", 20, "the commit of slot b")
        node.ok("rollback", "--reboot")
        node.check_boot("a-good", "after rollback --reboot")
        wait_until(lambda: os.path.exists(node.marker), 10, "the reboot marker")
    finally:
        node.close()


@boot_loader_case
def mark_good_by_hand_during_a_try(suite, node_name, boot_loader):
    node = standard_node(suite, node_name, boot_loader=boot_loader)
    new = suite.builds["1.1.0"]
    try:
        # A slow check: the gate is still running when the operator commits.
        release = add_slow_check(node, 0)
        install_and_boot_into_b(node, new)
        status = node.status()
        check_equal(status["state"]["operation"]["kind"], "trying", "operation during the try")
        check_equal(status["state"]["slots"]["b"]["state"], "trying", "slot b record during the try")
        node.check_boot("b-tried", "during the try")
        message = node.ok("mark-good").json["message"]
        check_in("committed", message, "mark-good message")
        node.check_boot("b-good", "after mark-good", uki_b=new.uki_b)
        status = node.status()
        check_equal(status["state"]["slots"]["b"]["state"], "good", "slot b record")
        check_equal(status["state"]["operation"]["kind"], "idle", "operation")
        open(release, "w").close()
        time.sleep(1.0)
        status = node.status()
        check_equal(status["state"]["slots"]["b"]["state"], "good", "slot b record after the gate ended")
        check(not os.path.exists(node.marker), "rebooted")
    finally:
        node.close()


@boot_loader_case
def mark_bad_by_hand_during_a_try(suite, node_name, boot_loader):
    node = standard_node(suite, node_name, boot_loader=boot_loader)
    new = suite.builds["1.1.0"]
    try:
        release = add_slow_check(node, 0)
        install_and_boot_into_b(node, new)
        message = node.ok("mark-bad", "--reason", "looks wrong").json["message"]
        check_in("marked bad", message, "mark-bad message")
        node.check_boot("b-bad", "after mark-bad during the try")
        open(release, "w").close()
        # The health gate that was still running must not undo the operator's decision.
        time.sleep(1.5)
        status = node.status()
        check_equal(status["state"]["slots"]["b"]["state"], "bad", "slot b record after the gate ended")
        node.check_boot("b-bad", "after the gate ended")
    finally:
        node.close()


@boot_loader_case
def mark_good_by_hand_then_failing_gate(suite, node_name, boot_loader):
    node = standard_node(suite, node_name, boot_loader=boot_loader)
    new = suite.builds["1.1.0"]
    try:
        # The gate is still running when the operator commits; then its check fails.
        release = add_slow_check(node, 1)
        install_and_boot_into_b(node, new)
        node.ok("mark-good")
        node.check_boot("b-good", "after mark-good")
        open(release, "w").close()
        time.sleep(1.5)
        status = node.status()
        check_equal(status["state"]["slots"]["b"]["state"], "good", "slot b record after the gate ended")
        node.check_boot("b-good", "after the gate ended")
        check(not os.path.exists(node.marker), "the gate rebooted after the operator's mark-good")
    finally:
        node.close()


# --- RAUC's CLI against the agent's de.pengutronix.rauc API (docs/rauc.md) -----------

RAUC_MISSING = ("Debian's rauc CLI is not installed: install it with `apt-get install -y rauc` "
                "(image-builder/scripts/test-tools.sh does; the package is the CLI alone)")


def rauc(node, *args, timeout=120):
    """Debian's `rauc` CLI with `args`, talking to the node's private bus
    (RAUC's CLI uses the session bus when DBUS_STARTER_BUS_TYPE=session)."""
    check(shutil.which("rauc") is not None, RAUC_MISSING)
    env = dict(node.env(), DBUS_STARTER_BUS_TYPE="session",
               DBUS_SESSION_BUS_ADDRESS=node.env()["DBUS_SYSTEM_BUS_ADDRESS"])
    completed = subprocess.run(["rauc", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, timeout=timeout, cwd=node.dir)
    return Result(completed)


def rauc_ok(node, *args, timeout=120):
    result = rauc(node, *args, timeout=timeout)
    if result.rc != 0:
        raise TestFailure(f"rauc {' '.join(args)} failed: {result}\n--- daemon log:\n{node.log_tail()}")
    return result


RAUC_SLOT = {"a": "rootfs.0", "b": "rootfs.1"}


def check_rauc_status_matches(node, what):
    """`rauc status --output-format=json` says what `racklet-update --json
    status` says: compatible (variant), booted slot, primary (next boot),
    each slot's bootname, state, boot status and version; returns it."""
    ours = node.status()
    theirs = json.loads(rauc_ok(node, "status", "--detailed", "--output-format=json").out)
    check_equal(theirs.get("compatible"), ours["booted"]["variant"], f"rauc compatible {what}")
    check_equal(theirs.get("variant"), ours["booted"]["arch"], f"rauc variant {what}")
    check_equal(theirs.get("booted"), ours["booted"]["slot"].upper(), f"rauc booted {what}")
    check_equal(theirs.get("boot_primary"), RAUC_SLOT[ours["next_boot"]], f"rauc boot_primary {what}")
    slots = {name: fields for entry in theirs["slots"] for name, fields in entry.items()}
    check_equal(sorted(slots), ["rootfs.0", "rootfs.1"], f"rauc slots {what}")
    for slot in ours["boot_slots"]:
        fields = slots[RAUC_SLOT[slot["slot"]]]
        name = f"rauc {RAUC_SLOT[slot['slot']]} {what}"
        check_equal(fields.get("bootname"), slot["slot"].upper(), f"{name} bootname")
        check_equal(fields.get("class"), "rootfs", f"{name} class")
        check_equal(fields.get("state"), "booted" if slot["booted"] else "inactive", f"{name} state")
        usable = slot["boot_state"] == "good" or re.fullmatch(r"trying \([1-9]\d* tries left\)", slot["boot_state"])
        check_equal(fields.get("boot_status"), "good" if usable else "bad", f"{name} boot_status")
        bundle = (fields.get("slot_status") or {}).get("bundle") or {}
        check_equal(bundle.get("version"), slot["version"], f"{name} bundle version")
    return theirs


@case
def rauc_cli_status_marks_and_install(suite, node_name):
    """Debian's rauc CLI against the agent's RAUC API: `rauc status` (text
    and JSON, against `racklet-update status`), `rauc status mark-good`,
    `rauc install DIR` from a copy of the repository (progress lines, exit
    code from Completed), refused installs, mark-good during the try, and
    `rauc status mark-active other` as a rollback."""
    node = standard_node(suite, node_name)
    new = suite.builds["1.1.0"]
    try:
        # Status for people and as JSON.
        text = ANSI.sub("", rauc_ok(node, "status").out)
        for line in ("Compatible:  qemu-x86_64", "Booted from: rootfs.0 (A)", "Activated: rootfs.0 (A)"):
            check_in(line, text.splitlines(), "rauc status")
        check(re.search(r"\[rootfs\.0\] \(/dev/disk/by-partlabel/root-a, raw, booted\)", text),
              f"rauc status: rootfs.0 booted:\n{text}")
        check(re.search(r"\[rootfs\.1\] \(/dev/disk/by-partlabel/root-b, raw, inactive\)", text),
              f"rauc status: rootfs.1 inactive:\n{text}")
        check_rauc_status_matches(node, "at the start")
        # mark-good of the committed booted slot: done, nothing changes.
        good = rauc_ok(node, "status", "mark-good")
        check_in("marked slot rootfs.0 as good", good.out, "rauc status mark-good")
        check_equal(node.status()["state"]["slots"]["a"]["state"], "good", "slot a after rauc mark-good")
        # Refused: a directory that is no repository copy (exit code non-zero, nothing written).
        empty = os.path.join(node.dir, "not-a-repo")
        os.makedirs(empty)
        refused = rauc(node, "install", empty)
        check(refused.rc != 0, f"rauc install of an empty directory succeeded: {refused}")
        check_in("no metadata/ directory", refused.out + refused.err, "rauc install of an empty directory")
        node.assert_b_unbootable()
        # Refused: an argument RAUC does not know (InstallBundle's args).
        bogus = run(["busctl", f"--address={suite.bus_address}", "call", "de.pengutronix.rauc", "/",
                     "de.pengutronix.rauc.Installer", "InstallBundle", "sa{sv}", empty, "1", "bogus", "b", "true"],
                    check_rc=False)
        check(bogus.returncode != 0 and "Unsupported key: bogus" in bogus.stderr,
              f"InstallBundle with an unknown key: {bogus.stdout}{bogus.stderr}")
        # Install from a copy of the repository (a USB stick, say).
        usb = os.path.join(node.dir, "usb")
        shutil.copytree(node.repo, usb)
        installed = rauc(node, "install", usb)
        check_equal(installed.rc, 0, f"rauc install {usb}: {installed}")
        lines = installed.out.splitlines()
        check(any(re.fullmatch(r"\s*\d{1,2}% Writing slot rootfs\.1", line) for line in lines),
              f"rauc install printed no write progress: {installed.out!r}")
        check_in("100% Installing done.", [line.strip() for line in lines], "rauc install's last progress")
        check_in(f"Installing `{usb}` succeeded", installed.out, "rauc install's result")
        node.assert_installed(new)
        status = node.status()
        check_equal(status["state"]["operation"], {"kind": "installed", "version": "1.1.0", "slot": "b"},
                    "operation after rauc install")
        check(not os.path.exists(node.marker), "rauc install rebooted")
        theirs = check_rauc_status_matches(node, "after rauc install")
        check_equal(theirs["boot_primary"], "rootfs.1", "rauc primary after the install")
        # A second install while one waits for its reboot: refused, exit code non-zero.
        again = rauc(node, "install", usb)
        check(again.rc != 0, f"a second rauc install succeeded: {again}")
        check_in("cancel it first", again.out + again.err, "a second rauc install")
        # Boot B for its try; the operator commits it with rauc while the gate still runs.
        release = add_slow_check(node, 0)
        node.reboot_into("b", new)
        node.start()
        check_rauc_status_matches(node, "during the try")
        committed = rauc_ok(node, "status", "mark-good", "booted")
        check_in("marked slot rootfs.1 as good: slot b (1.1.0) committed", committed.out, "rauc mark-good booted")
        node.check_boot("b-good", "after rauc status mark-good", uki_b=new.uki_b)
        open(release, "w").close()
        # mark-active other: a rollback to slot A, which holds a good version.
        active = rauc_ok(node, "status", "mark-active", "other")
        check_in("activated slot rootfs.0", active.out, "rauc status mark-active other")
        node.check_boot("a-good", "after rauc status mark-active other")
        check_equal(check_rauc_status_matches(node, "after the rollback")["boot_primary"], "rootfs.0",
                    "rauc primary after mark-active other")
        # No sense in our model: refused, saying why.
        bad_other = rauc(node, "status", "mark-bad", "other")
        check(bad_other.rc != 0, f"rauc status mark-bad other succeeded: {bad_other}")
        check_in("only the booted slot can be marked bad", bad_other.out + bad_other.err, "mark-bad other")
        node.check_boot("a-good", "after the refused mark-bad other")
    finally:
        node.close()


# --- runner ------------------------------------------------------------------------


# --- delta installs (issue 16) ----------------------------------------------------


def patch_path(node, new, source, artifact):
    """The published patch that rebuilds `artifact` of `new` from `source`."""
    return node.target_path(new, f"from-{source.version}-{artifact}.zst-patch")


def last_install(node):
    record = node.status().get("last_install")
    check(record is not None, "status has no last_install after an install")
    return record


def installed_in_full(node, code, reason_part):
    """The last install took the full download, for reason `code`, its message
    naming `reason_part`; returns its record."""
    record = last_install(node)
    check_equal(record["path"], "full", f"last_install path ({record})")
    check_equal(record["reason"]["code"], code, f"reason code ({record})")
    check_in(reason_part, record["reason"]["message"], "reason")
    return record


def delta_log_lines(node):
    with open(node.log) as source:
        return [ANSI.sub("", line) for line in source if "delta" in line or "full download" in line]


@boot_loader_case
def delta_from_the_booted_version_installs_and_commits(suite, node_name, boot_loader):
    """1.0.0 runs; 2.0.0 is published with patches from 1.0.0: the agent
    downloads the two patches, rebuilds root and UKI from slot A, computes
    the hash tree, and 2.0.0 installs, boots and commits."""
    node = standard_node(suite, node_name, versions=("1.0.0", DELTA_VERSION), boot_loader=boot_loader)
    old, new = suite.builds["1.0.0"], suite.builds[DELTA_VERSION]
    try:
        root_patch = patch_path(node, new, old, "root.erofs")
        uki_patch = patch_path(node, new, old, "uki-b.efi")
        patch_bytes = os.path.getsize(root_patch) + os.path.getsize(uki_patch)
        full_bytes = sum(os.path.getsize(node.target_path(new, name))
                         for name in ("root.erofs.zst", "verity.img.zst", "uki-b.efi.zst"))
        check(patch_bytes * 20 < full_bytes, f"patches {patch_bytes} bytes vs full {full_bytes}: not a small delta")
        node.ok("apply")
        node.assert_installed(new)
        record = last_install(node)
        check_equal(record["path"], "delta", f"last_install path ({record})")
        check_equal(record["from_version"], "1.0.0", "last_install from_version")
        check_equal(record["version"], DELTA_VERSION, "last_install version")
        check_equal(record["downloaded_bytes"], patch_bytes, "last_install downloaded_bytes")
        check_equal(record["full_bytes"], full_bytes, "last_install full_bytes")
        human = run([UPDATE, "status"], env=dict(node.env(), RACKLET_LOG="warn")).stdout
        check(re.search(r"^install: +2\.0\.0 at \S+: delta from 1\.0\.0 \(\d+\.\d kB of \d+\.\d MB\)$", human, re.M),
              f"status (human) should say the delta:\n{human}")
        logged = "".join(delta_log_lines(node))
        check_in("installing by delta from 1.0.0", logged, "daemon log")
        check_in("delta applied and verified", logged, "daemon log")
        check("full download" not in logged, f"the log mentions a full download:\n{logged}")
        node.reboot_into("b", new)
        node.add_check("10-ok.sh", "echo all good; exit 0")
        node.start()

        def committed():
            status = node.status()
            return status["state"]["slots"]["b"]["state"] == "good" and status
        status = wait_until(committed, 20, "the health gate to commit slot b")
        check_equal(status["booted"]["version"], DELTA_VERSION, "booted version after the reboot")
        check_equal(status["last_install"]["path"], "delta", "last_install after the reboot")
    finally:
        node.close()


@case
def tampered_patch_falls_back_to_full_and_installs(suite, node_name):
    """The root patch on the server is not the signed one: refused before
    decoding, and 2.0.0 still installs by the full download."""
    node = standard_node(suite, node_name, versions=("1.0.0", DELTA_VERSION), start=False)
    old, new = suite.builds["1.0.0"], suite.builds[DELTA_VERSION]
    try:
        path = patch_path(node, new, old, "root.erofs")
        flip_bit(path, os.path.getsize(path) // 2)
        node.start()
        node.ok("apply")
        node.assert_installed(new)
        record = installed_in_full(node, "delta-failed", os.path.basename(path).split(".", 1)[1])
        check_in("sha", record["reason"]["message"], "reason says the hash")
        check(record["downloaded_bytes"] > record["full_bytes"], f"downloaded bytes count the patches too: {record}")
        check(node.status()["state"]["last_error"] is None, "last_error after the fallback install")
        check_in("installing by full download", "".join(delta_log_lines(node)), "daemon log")
    finally:
        node.close()


@case
def booted_slot_not_a_delta_source_falls_back_to_full(suite, node_name):
    """2.0.0's only delta starts from 1.5.0 (both small changes of 1.0.0)
    while the node runs 1.0.0: no delta for this root, so the full
    download, and 2.0.0 installs."""
    node = Node(suite, node_name)
    new = suite.builds[DELTA_VERSION]
    try:
        node.publish(OTHER_SOURCE_VERSION)
        node.publish(DELTA_VERSION)
        node.start()
        node.ok("apply")
        node.assert_installed(new)
        record = installed_in_full(node, "no-delta-for-this-root", "no delta from this slot's version (1.0.0")
        check_equal(record["downloaded_bytes"], record["full_bytes"], "downloaded bytes")
        human = run([UPDATE, "status"], env=dict(node.env(), RACKLET_LOG="warn")).stdout
        check_in("full: no delta from this slot's version", human, "status (human)")
    finally:
        node.close()


@case
def interrupted_delta_falls_back_to_full(suite, node_name):
    """The agent died during a delta to 2.0.0 (its record of the delta's
    start is still in the state directory, as a SIGBUS under a memory map
    would leave it): the next install of 2.0.0 goes full instead of trying
    the same delta again, and the record is gone."""
    node = standard_node(suite, node_name, versions=("1.0.0", DELTA_VERSION), start=False)
    new = suite.builds[DELTA_VERSION]
    started = os.path.join(node.state_dir, "delta-started")
    try:
        os.makedirs(node.state_dir, exist_ok=True)
        with open(started, "w") as out:
            out.write(f"{DELTA_VERSION}\n")
        node.start()
        node.ok("apply")
        node.assert_installed(new)
        installed_in_full(node, "delta-interrupted", f"the last delta to {DELTA_VERSION} never finished")
        check(not os.path.exists(started), f"{started} is still there after the full install")
    finally:
        node.close()


@case
def deltas_turned_off_on_the_node_go_full(suite, node_name):
    """`delta_updates = false` in the node's update.toml: 2.0.0 is published
    with a delta from 1.0.0, yet the node downloads the full update and says
    why; nothing of the delta is fetched."""
    node = standard_node(suite, node_name, versions=("1.0.0", DELTA_VERSION),
                         config="delta_updates = false\n")
    new = suite.builds[DELTA_VERSION]
    try:
        node.ok("apply")
        node.assert_installed(new)
        record = installed_in_full(node, "deltas-off", "delta_updates = false")
        check_equal(record["downloaded_bytes"], record["full_bytes"], "downloaded bytes")
    finally:
        node.close()


@case
def booted_uki_changed_falls_back_to_full(suite, node_name):
    """Slot A's UKI on the ESP is not the one 2.0.0's UKI patch starts from
    (its root still is): the source check refuses it, the full download
    installs 2.0.0, and slot A's files stay as they were."""
    node = standard_node(suite, node_name, versions=("1.0.0", DELTA_VERSION), start=False)
    new = suite.builds[DELTA_VERSION]
    try:
        with open(node.esp_file("racklet-a.efi"), "ab") as out:
            out.write(b"appended by a test")
        node.uki_a_sha = sha256_file(node.esp_file("racklet-a.efi"))
        node.start()
        node.ok("apply")
        node.assert_installed(new)
        installed_in_full(node, "delta-failed", "UKI")
    finally:
        node.close()


def main(argv):
    filters = []
    keep = False
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "-k" and args:
            filters.append(args.pop(0))
        elif arg == "--keep":
            keep = True
        else:
            sys.exit(__doc__)
    for binary in (UPDATE, IMAGE):
        if not os.access(binary, os.X_OK):
            sys.exit(f"no executable {binary}; run tests/agent/run.sh (it builds them)")
    selected = [c for c in CASES if not filters or any(f in c[0] for f in filters)]
    suite = Suite(keep=keep)
    passed = failed = 0
    began = time.monotonic()
    try:
        suite.setup()
        for name, function, arguments in selected:
            start = time.monotonic()
            try:
                function(suite, node_name_of(name), **arguments)
            except Exception as error:  # noqa: BLE001 - report every failure
                failed += 1
                note = f" (known agent bug: {KNOWN_BUGS[name]})" if name in KNOWN_BUGS else ""
                print(f"FAIL {name}{note} [{time.monotonic() - start:.1f}s]")
                detail = str(error) if isinstance(error, TestFailure) else traceback.format_exc()
                for line in detail.rstrip().splitlines():
                    print(f"     {line}")
                log = os.path.join(suite.tmp, node_name_of(name), "daemon.log")
                if os.path.exists(log):
                    with open(log) as source:
                        tail = source.readlines()[-15:]
                    print("     --- daemon log (last lines):")
                    for line in tail:
                        print("     | " + ANSI.sub("", line.rstrip()))
            else:
                passed += 1
                print(f"ok   {name} [{time.monotonic() - start:.1f}s]")
            sys.stdout.flush()
    finally:
        suite.teardown()
    if keep:
        print(f"kept {suite.tmp}")
    print(f"tests/agent: {len(selected)} cases in {time.monotonic() - began:.0f}s")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
