#!/usr/bin/env python3
"""Write a synthetic build directory for the update agent's tests:
<dir>/manifest.json plus <dir>/update/*, like tests/repo/make_build.py but with
a real dm-verity tree: the root file system is random data (a multiple of
4096 bytes), the hash device is made by `veritysetup format` (superblock at
block 0, tree from block 1, sha256, 4096-byte blocks, a 32-byte salt), both
zstd-compressed. The UKIs are random bytes.

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


def verity_format(root_path: str, hash_path: str, salt: str) -> str:
    """`veritysetup format`; returns the root hash (hex)."""
    if os.path.exists(hash_path):
        os.unlink(hash_path)
    result = subprocess.run(
        [
            "veritysetup", "format",
            "--hash=sha256", "--data-block-size=4096", "--hash-block-size=4096",
            "--format=1", f"--salt={salt}",
            "--uuid=00000000-0000-4000-8000-000000000001",
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


def make_build(directory: str, version: str, root_bytes: int = 4 << 20,
               variant: str = "qemu-x86_64") -> dict:
    if root_bytes <= 0 or root_bytes % 4096:
        raise ValueError("ROOT_BYTES must be a positive multiple of 4096")
    update = os.path.join(directory, "update")
    raw = os.path.join(directory, "raw")
    os.makedirs(update, exist_ok=True)
    os.makedirs(raw, exist_ok=True)
    root = os.urandom(root_bytes)
    root_path = os.path.join(raw, "root.img")
    hash_path = os.path.join(raw, "verity.img")
    with open(root_path, "wb") as out:
        out.write(root)
    salt = os.urandom(32).hex()
    root_hash = verity_format(root_path, hash_path, salt)
    with open(hash_path, "rb") as source:
        verity = source.read()
    uki_a = b"MZ racklet uki a " + version.encode() + b" " + os.urandom(8192)
    uki_b = b"MZ racklet uki b " + version.encode() + b" " + os.urandom(8192)
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
