#!/usr/bin/env python3
"""Write a synthetic build directory: <dir>/manifest.json plus <dir>/update/*.

The manifest follows os-format's BuildManifest (schema 1, see
os-format/src/manifest.rs); the artifacts are pseudo-random bytes, not real
erofs or UKIs (the publisher checks their sizes and sha256 digests, and
decompresses them to compute delta patches). Every version of a variant shares
most of its bytes with the others (the same seed), with the version written
into the middle, so the patches between two versions are small, as between
two real builds. Compressed artifacts are real zstd frames (the `zstd` tool).

Usage: make_build.py DIR VERSION [VARIANT]
"""

import hashlib
import json
import os
import random
import subprocess
import sys

ARTIFACTS = [
    # (name, kind fields, compression)
    ("root.erofs.zst", {"kind": "root-filesystem"}, "zstd"),
    ("verity.img.zst", {"kind": "verity-hash-tree"}, "zstd"),
    ("uki-a.efi", {"kind": "kernel-image", "slot": "a"}, "none"),
    ("uki-b.efi", {"kind": "kernel-image", "slot": "b"}, "none"),
]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_build(directory: str, version: str, variant: str = "qemu-x86_64") -> dict:
    update = os.path.join(directory, "update")
    os.makedirs(update, exist_ok=True)
    artifacts = []
    for index, (name, kind, compression) in enumerate(ARTIFACTS):
        # The two UKIs differ only in their slot, as real ones do (the
        # command line): a patch rebuilds one from the other.
        length = 64 * 1024 * (min(index, 2) + 2) + index
        shared = random.Random(f"{variant}-{kind['kind']}").randbytes(length)
        stamp = f"version {version} {name}".encode()
        middle = length // 2
        uncompressed = shared[:middle] + stamp + shared[middle + len(stamp) :]
        if compression == "zstd":
            data = subprocess.run(
                ["zstd", "-q", "-3", "-c"], input=uncompressed, capture_output=True, check=True
            ).stdout
        else:
            data = uncompressed
        with open(os.path.join(update, name), "wb") as out:
            out.write(data)
        artifact = {"name": name}
        artifact.update(kind)
        artifact.update(
            {
                "compression": compression,
                "size": len(data),
                "sha256": sha256(data),
                "uncompressed_size": len(uncompressed),
                "uncompressed_sha256": sha256(uncompressed),
            }
        )
        artifacts.append(artifact)
    manifest = {
        "schema": 1,
        "image_name": "racklet-os",
        "variant": variant,
        "arch": "x86_64",
        "version": version,
        "source_date_epoch": 1795000000,
        "kernel_version": "6.1.0-28-cloud-amd64",
        "kernel_cmdline": "ro racklet.slot=a",
        "verity": {
            "root_hash": "00" * 32,
            "salt": "11" * 32,
            "hash_algorithm": "sha256",
            "data_block_size": 4096,
            "hash_block_size": 4096,
            "data_blocks": 10,
        },
        "k3s": {"kind": "absent"},
        "partitions": {"esp": 1, "root": 2, "verity": 3, "data": 4},
        "required_units": ["containerd.service"],
        "artifacts": artifacts,
        "outputs": [],
        "packages": [],
    }
    with open(os.path.join(directory, "manifest.json"), "w") as out:
        json.dump(manifest, out, indent=2)
        out.write("\n")
    return manifest


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    make_build(*sys.argv[1:])
