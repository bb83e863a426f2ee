#!/usr/bin/env python3
"""Check what the Raspberry Pi 4 firmware and U-Boot read from an rpi4 image's
ESP, as files (the Pi firmware stage cannot be emulated here):
config.txt, start4.elf, fixup4.dat, u-boot.bin and the DTB (byte-identical to
the pinned Debian packages' files), boot.scr (a U-Boot script image), the two
A/B state copies (valid CRC32, slot A committed) and slot A's UKI."""

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zlib

build = sys.argv[1]
manifest = json.load(open(os.path.join(build, "manifest.json")))
disk = os.path.join(build, "disk.img")
cache = os.environ.get("RACKLET_CACHE", os.path.expanduser("~/.cache/racklet"))
lock = open(os.path.join(os.path.dirname(__file__), "../../variants/rpi4/packages.lock")).read()
errors = []


def expect(condition, message):
    if not condition:
        errors.append(message)


def package_file(package, path):
    """A file's bytes from a pinned .deb in the cache."""
    sha = next(p["sha256"] for p in manifest["packages"] if p["name"] == package)
    tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", os.path.join(cache, "blobs/sha256", sha)], capture_output=True, check=True).stdout
    return subprocess.run(["tar", "-xO", "." + path], input=tar, capture_output=True, check=True).stdout


table = json.loads(subprocess.check_output(["sfdisk", "--json", disk]))["partitiontable"]
esp = next(p for p in table["partitions"] if p["name"] == "esp")
with tempfile.TemporaryDirectory() as scratch:
    image = os.path.join(scratch, "esp.img")
    with open(disk, "rb") as source, open(image, "wb") as target:
        source.seek(esp["start"] * 512)
        target.write(source.read(esp["size"] * 512))

    def read(name):
        return subprocess.run(["mtype", "-i", image, "::/" + name], capture_output=True, check=True).stdout

    config = read("config.txt").decode()
    lines = [line.strip() for line in config.splitlines()]
    expect("arm_64bit=1" in lines, "config.txt lacks arm_64bit=1")
    expect("kernel=u-boot.bin" in lines, "config.txt lacks kernel=u-boot.bin")
    expect(read("start4.elf") == package_file("raspi-firmware", "/usr/lib/raspi-firmware/start4.elf"), "start4.elf differs from raspi-firmware's")
    expect(read("fixup4.dat") == package_file("raspi-firmware", "/usr/lib/raspi-firmware/fixup4.dat"), "fixup4.dat differs from raspi-firmware's")
    expect(read("u-boot.bin") == package_file("u-boot-rpi", "/usr/lib/u-boot/rpi_arm64/u-boot.bin"), "u-boot.bin differs from u-boot-rpi's")
    kernel = manifest["kernel_version"]
    kernel_package = "linux-image-" + kernel
    dtb = read("bcm2711-rpi-4-b.dtb")
    expect(dtb[:4] == bytes.fromhex("d00dfeed"), "bcm2711-rpi-4-b.dtb is not a flattened device tree")
    expect(dtb == package_file(kernel_package, f"/usr/lib/linux-image-{kernel}/broadcom/bcm2711-rpi-4-b.dtb"), "the DTB differs from the kernel package's")
    script = os.path.join(scratch, "boot.scr")
    open(script, "wb").write(read("boot.scr"))
    listing = subprocess.run(["mkimage", "-l", script], capture_output=True, text=True).stdout
    expect("Script" in listing, f"boot.scr is not a U-Boot script image: {listing}")
    expect(b"bootefi" in read("boot.scr") and b"racklet/state-" in read("boot.scr"), "boot.scr does not hold the A/B script")
    for copy in ("racklet/state-1.env", "racklet/state-2.env"):
        data = read(copy)
        expect(len(data) == 4096, f"{copy} is {len(data)} bytes")
        crc = int.from_bytes(data[:4], "little")
        expect(crc == zlib.crc32(data[4:]), f"{copy}: bad CRC32")
        pairs = dict(entry.split("=", 1) for entry in data[4:].split(b"\0\0")[0].decode().split("\0") if entry)
        expect(pairs.get("racklet_committed") == "a" and pairs.get("racklet_order") == "a", f"{copy}: {pairs}")
        expect(pairs.get("racklet_tries_a") == "-" and pairs.get("racklet_tries_b") == "-", f"{copy}: {pairs}")
    uki = read("EFI/Linux/racklet-a.efi")
    expect(hashlib.sha256(uki).hexdigest() == next(a["uncompressed_sha256"] for a in manifest["artifacts"] if a["name"] == "uki-a.efi.zst"), "the ESP's UKI is not update/uki-a.efi.zst's content")

for error in errors:
    print("rpi4 ESP:", error)
sys.exit(1 if errors else 0)
