#!/usr/bin/env python3
"""Write a synthetic build directory for the update agent's tests:
<dir>/manifest.json plus <dir>/update/*, like tests/repo/make_build.py but with
a real dm-verity tree: the root file system is random data (a multiple of
4096 bytes), the hash device is made by `veritysetup format` (superblock at
block 0, tree from block 1, sha256, 4096-byte blocks, a 32-byte salt), both
zstd-compressed. The UKIs are random bytes.

A build made `from_build` another one (make_build's `base`) keeps the
base's root and UKIs but for a few changed blocks and bytes, as a small
update would: what a delta patch rebuilds on the node. The hash device's
UUID follows the image builder's rule (image-builder/src/build/stages.rs:
derived from "racklet-verity" and the root's sha256), so a hash tree the
agent computes on the node is byte for byte the published one.

Usage: make_build.py DIR VERSION [ROOT_BYTES] [VARIANT]
Prints the manifest's verity section as JSON on stdout.
"""

import hashlib
import json
import os
import re
import subprocess
import sys


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def zstd(data: bytes) -> bytes:
    # -1: fast; the data is random, compression gains nothing anyway.
    return subprocess.run(
        ["zstd", "-q", "-1", "-c", "-"], input=data, stdout=subprocess.PIPE, check=True
    ).stdout


def hash_device_uuid(root: bytes) -> str:
    """The image builder's verity superblock UUID for a root: Guid::derive
    (sha256's first 16 bytes, RFC 4122 version 4 and variant bits) of the
    length-prefixed parts "racklet-verity" and the root's sha256."""
    seed = b""
    for part in (b"racklet-verity", hashlib.sha256(root).digest()):
        seed += len(part).to_bytes(8, "little") + part
    raw = bytearray(hashlib.sha256(seed).digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    h = raw.hex()
    return f"{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def verity_format(root_path: str, hash_path: str, salt: str, uuid: str) -> str:
    """`veritysetup format`; returns the root hash (hex)."""
    if os.path.exists(hash_path):
        os.unlink(hash_path)
    result = subprocess.run(
        [
            "veritysetup", "format",
            "--hash=sha256", "--data-block-size=4096", "--hash-block-size=4096",
            "--format=1", f"--salt={salt}",
            f"--uuid={uuid}",
            root_path, hash_path,
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=True,
    )
    match = re.search(r"Root hash:\s*([0-9a-f]{64})", result.stdout)
    if not match:
        raise RuntimeError(f"veritysetup format printed no root hash:\n{result.stdout}")
    return match.group(1)


def artifact(name, kind, compression, shipped, uncompressed):
    entry = {"name": name}
    entry.update(kind)
    entry.update(
        {
            "compression": compression,
            "size": len(shipped),
            "sha256": sha256(shipped),
            "uncompressed_size": len(uncompressed),
            "uncompressed_sha256": sha256(uncompressed),
        }
    )
    return entry


def changed(data: bytes, version: str, blocks: int) -> bytes:
    """`data` with `blocks` 4096-byte blocks spread over it overwritten."""
    out = bytearray(data)
    for index in range(blocks):
        at = (index * 7919 + 1) * 4096 % max(len(out) - 4096, 1)
        at -= at % 4096
        out[at:at + 4096] = os.urandom(4096)
    marker = f" {version} ".encode()
    out[17:17 + len(marker)] = marker
    return bytes(out)


def make_build(directory: str, version: str, root_bytes: int = 4 << 20,
               variant: str = "qemu-x86_64", base: str = None) -> dict:
    """`base`: the directory of a build this one changes a little (see the
    module documentation); its root size is kept."""
    if root_bytes <= 0 or root_bytes % 4096:
        raise ValueError("ROOT_BYTES must be a positive multiple of 4096")
    update = os.path.join(directory, "update")
    raw = os.path.join(directory, "raw")
    os.makedirs(update, exist_ok=True)
    os.makedirs(raw, exist_ok=True)
    if base is not None:
        def read_base(name):
            with open(os.path.join(base, "raw", name), "rb") as source:
                return source.read()
        root = changed(read_base("root.img"), version, 8)
        base_uki_a, base_uki_b = read_base("uki-a.efi"), read_base("uki-b.efi")
    else:
        root = os.urandom(root_bytes)
    root_path = os.path.join(raw, "root.img")
    hash_path = os.path.join(raw, "verity.img")
    with open(root_path, "wb") as out:
        out.write(root)
    salt = os.urandom(32).hex()
    root_hash = verity_format(root_path, hash_path, salt, hash_device_uuid(root))
    with open(hash_path, "rb") as source:
        verity = source.read()
    if base is not None:
        # Each slot's UKI is the base's with its version changed.
        uki_a, uki_b = changed(base_uki_a, version, 0), changed(base_uki_b, version, 0)
    else:
        # The two slots' UKIs differ in their command line only (the slot).
        body = b" " + os.urandom(64 << 10)
        uki_a = b"MZ racklet uki a " + version.encode() + body
        uki_b = b"MZ racklet uki b " + version.encode() + body
    for name, data in (("uki-a.efi", uki_a), ("uki-b.efi", uki_b)):
        with open(os.path.join(raw, name), "wb") as out:
            out.write(data)

    root_zst = zstd(root)
    verity_zst = zstd(verity)
    files = [
        ("root.erofs.zst", {"kind": "root-filesystem"}, "zstd", root_zst, root),
        ("verity.img.zst", {"kind": "verity-hash-tree"}, "zstd", verity_zst, verity),
        # Slot A's UKI shipped as it is, slot B's compressed (as the image
        # builder ships both): every install into B takes the zstd path.
        ("uki-a.efi", {"kind": "kernel-image", "slot": "a"}, "none", uki_a, uki_a),
        ("uki-b.efi.zst", {"kind": "kernel-image", "slot": "b"}, "zstd", zstd(uki_b), uki_b),
    ]
    artifacts = []
    for name, kind, compression, shipped, uncompressed in files:
        with open(os.path.join(update, name), "wb") as out:
            out.write(shipped)
        artifacts.append(artifact(name, kind, compression, shipped, uncompressed))
    verity_info = {
        "root_hash": root_hash,
        "salt": salt,
        "hash_algorithm": "sha256",
        "data_block_size": 4096,
        "hash_block_size": 4096,
        "data_blocks": root_bytes // 4096,
    }
    manifest = {
        "schema": 1,
        "image_name": "racklet-os",
        "variant": variant,
        "arch": "x86_64",
        "version": version,
        "source_date_epoch": 1700000000,
        "kernel_version": "6.1.0-28-cloud-amd64",
        "kernel_cmdline": "ro racklet.slot=a",
        "verity": verity_info,
        "k3s": {"kind": "absent"},
        "partitions": {"esp": 1, "root": 2, "verity": 3, "data": 6},
        "required_units": [],
        "artifacts": artifacts,
        "outputs": [],
        "packages": [],
    }
    with open(os.path.join(directory, "manifest.json"), "w") as out:
        json.dump(manifest, out, indent=2)
        out.write("\n")
    return manifest


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4, 5):
        sys.exit(__doc__)
    size = int(sys.argv[3]) if len(sys.argv) > 3 else 4 << 20
    args = [sys.argv[1], sys.argv[2], size] + sys.argv[4:]
    print(json.dumps(make_build(*args)["verity"]))
