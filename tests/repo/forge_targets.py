#!/usr/bin/env python3
"""Write the next targets, snapshot and timestamp metadata of a published
repository by hand, as a thief of one targets key would: the targets role is
signed with the key file given (which may be one a root rotation retired),
snapshot and timestamp with the repository's own keys, so that only the
targets signature decides whether a client accepts it. One target is added
(forged.txt) so the forgery shows in what a client lists.

Usage: forge_targets.py REPO_DIR KEYS_DIR TARGETS_KEY_FILE

REPO_DIR is changed in place (give it a copy); KEYS_DIR is the publishing key
directory (its keys/snapshot-* and keys/timestamp-* sign). Prints the version
of the forged targets.json.
"""

import glob
import hashlib
import json
import os
import sys

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import Metadata, MetaFile, TargetFile

ED25519_OID = bytes.fromhex("2b6570")  # 1.3.101.112


def der_items(data: bytes):
    """The (tag, content) pairs of a DER sequence's content, in order."""
    offset = 0
    while offset < len(data):
        tag = data[offset]
        length = data[offset + 1]
        offset += 2
        if length & 0x80:
            count = length & 0x7F
            length = int.from_bytes(data[offset:offset + count], "big")
            offset += count
        yield tag, data[offset:offset + length]
        offset += length


def ed25519_signer(path: str, keyid: str) -> CryptoSigner:
    """A signer for a PKCS#8 (v1 or v2) ed25519 key file as racklet-image
    writes them; `cryptography` reads only v1, so the seed is taken out of
    the DER structure here."""
    with open(path, "rb") as data:
        der = data.read()
    [(tag, body)] = list(der_items(der))
    assert tag == 0x30, f"{path}: not a DER sequence"
    items = list(der_items(body))
    (_, algorithm), (octets_tag, octets) = items[1], items[2]
    oid = dict(der_items(algorithm)).get(0x06)
    assert oid == ED25519_OID and octets_tag == 0x04, f"{path}: not an ed25519 PKCS#8 key"
    [(seed_tag, seed)] = list(der_items(octets))
    assert seed_tag == 0x04 and len(seed) == 32, f"{path}: no 32-byte ed25519 seed"
    private = Ed25519PrivateKey.from_private_bytes(seed)
    public = private.public_key().public_bytes_raw().hex()
    return CryptoSigner(private, SSlibKey(keyid, "ed25519", "ed25519", {"public": public}))


def public_hex(path: str) -> str:
    return ed25519_signer(path, "unknown").public_key.keyval["public"]


def key_id_of(metadata_dir: str, public: str) -> str:
    """The key id any published root gives this public key."""
    for path in sorted(glob.glob(os.path.join(metadata_dir, "*.root.json"))):
        with open(path, "rb") as data:
            keys = json.load(data)["signed"]["keys"]
        for keyid, key in keys.items():
            if key["keyval"]["public"] == public:
                return keyid
    raise SystemExit(f"no root in {metadata_dir} lists the public key {public}")


def main() -> int:
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    repo, keys, targets_key = sys.argv[1:]
    metadata_dir = os.path.join(repo, "metadata")

    def signer_for(path: str) -> CryptoSigner:
        return ed25519_signer(path, key_id_of(metadata_dir, public_hex(path)))

    def role_key(role: str) -> str:
        [path] = glob.glob(os.path.join(keys, "keys", f"{role}-*.pk8.der"))
        return path

    def load(name: str) -> Metadata:
        with open(os.path.join(metadata_dir, name), "rb") as data:
            return Metadata.from_bytes(data.read())

    def store(metadata: Metadata, signer: CryptoSigner, name: str) -> bytes:
        metadata.signatures.clear()
        metadata.sign(signer)
        data = metadata.to_bytes()
        with open(os.path.join(metadata_dir, name), "wb") as out:
            out.write(data)
        return data

    timestamp = load("timestamp.json")
    snapshot = load(f"{timestamp.signed.snapshot_meta.version}.snapshot.json")
    targets = load(f'{snapshot.signed.meta["targets.json"].version}.targets.json')

    forged = b"installed by whoever holds this targets key\n"
    target = TargetFile.from_data("forged.txt", forged, ["sha256"])
    with open(os.path.join(repo, "targets", f'{target.hashes["sha256"]}.forged.txt'), "wb") as out:
        out.write(forged)
    targets.signed.targets[target.path] = target
    targets.signed.version += 1
    targets_bytes = store(targets, signer_for(targets_key), f"{targets.signed.version}.targets.json")

    snapshot.signed.version += 1
    snapshot.signed.meta["targets.json"] = MetaFile(
        targets.signed.version,
        len(targets_bytes),
        {"sha256": hashlib.sha256(targets_bytes).hexdigest()},
    )
    snapshot_bytes = store(snapshot, signer_for(role_key("snapshot")), f"{snapshot.signed.version}.snapshot.json")

    timestamp.signed.version += 1
    timestamp.signed.snapshot_meta = MetaFile(
        snapshot.signed.version,
        len(snapshot_bytes),
        {"sha256": hashlib.sha256(snapshot_bytes).hexdigest()},
    )
    store(timestamp, signer_for(role_key("timestamp")), "timestamp.json")
    print(targets.signed.version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
