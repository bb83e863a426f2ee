#!/usr/bin/env python3
"""A second TUF client for the repository `racklet-image publish` writes.

Bootstraps python-tuf's ngclient with a root the caller trusts (normally
metadata/1.root.json), refreshes from an HTTP server, downloads every target
listed in targets.json, and checks each artifact's sha256 against the build
manifests given on the command line (and the update manifest target against
those builds too).

Usage:
  python_tuf_client.py --metadata-url URL --targets-url URL --root FILE
                       [--expect-root-version N] BUILD_DIR...

Exits 0 when every check passes, 1 otherwise; prints one line per check.
"""

import argparse
import hashlib
import json
import os
import sys
import tempfile

from tuf.api.metadata import Metadata, Root, Targets
from tuf.ngclient import Updater

UPDATE_MANIFEST_TARGET = "manifest.json"


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as data:
        for block in iter(lambda: data.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metadata-url", required=True)
    parser.add_argument("--targets-url", required=True)
    parser.add_argument("--root", required=True, help="the root.json to bootstrap from")
    parser.add_argument("--expect-root-version", type=int)
    parser.add_argument("builds", nargs="+", help="build directories (manifest.json + update/)")
    args = parser.parse_args()

    failures = []

    def check(ok: bool, what: str) -> None:
        print(("ok   " if ok else "FAIL ") + what)
        if not ok:
            failures.append(what)

    # Every artifact the builds say they made, by TUF target name.
    expected = {}
    builds = {}
    for build_dir in args.builds:
        with open(os.path.join(build_dir, "manifest.json"), "rb") as data:
            build = json.load(data)
        builds[(build["variant"], build["version"])] = build
        for artifact in build["artifacts"]:
            name = f'{build["variant"]}-{build["version"]}-{artifact["name"]}'
            expected[name] = (artifact["size"], artifact["sha256"])

    with open(args.root, "rb") as data:
        bootstrap = data.read()
    bootstrap_version = Metadata[Root].from_bytes(bootstrap).signed.version

    with tempfile.TemporaryDirectory(prefix="tuf-client-") as scratch:
        metadata_dir = os.path.join(scratch, "metadata")
        target_dir = os.path.join(scratch, "targets")
        os.makedirs(metadata_dir)
        os.makedirs(target_dir)
        updater = Updater(
            metadata_dir=metadata_dir,
            metadata_base_url=args.metadata_url,
            target_dir=target_dir,
            target_base_url=args.targets_url,
            bootstrap=bootstrap,
        )
        try:
            updater.refresh()
        except Exception as error:  # noqa: BLE001 - any refusal is a failure to report
            print(f"FAIL refresh: {type(error).__name__}: {error}")
            print("FAIL: python-tuf could not refresh the repository")
            return 1

        # python-tuf persists what it trusts; read the root and targets back.
        root = Metadata[Root].from_file(os.path.join(metadata_dir, "root.json")).signed
        print(f"bootstrapped with root version {bootstrap_version}, trusting root version {root.version}")
        if args.expect_root_version is not None:
            check(
                root.version == args.expect_root_version,
                f"trusted root version is {root.version} (expected {args.expect_root_version})",
            )
        targets = Metadata[Targets].from_file(os.path.join(metadata_dir, "targets.json")).signed
        names = sorted(targets.targets)
        print(f"targets.json version {targets.version} lists {len(names)} targets")

        for name in expected:
            check(name in names, f"{name} is listed in targets.json")
        check(UPDATE_MANIFEST_TARGET in names, f"{UPDATE_MANIFEST_TARGET} is listed in targets.json")

        downloaded = {}
        for name in names:
            info = updater.get_targetinfo(name)
            if info is None:
                check(False, f"{name}: get_targetinfo found nothing")
                continue
            try:
                path = updater.download_target(info, os.path.join(target_dir, name))
            except Exception as error:  # noqa: BLE001 - reported per target
                check(False, f"{name}: download refused: {type(error).__name__}: {error}")
                continue
            downloaded[name] = path
            actual = sha256_of(path)
            size = os.path.getsize(path)
            check(
                actual == info.hashes["sha256"] and size == info.length,
                f"{name}: {size} bytes, sha256 {actual} as targets.json signs",
            )
            if name in expected:
                want_size, want_sha = expected[name]
                check(
                    size == want_size and actual == want_sha,
                    f"{name}: matches the build's manifest.json",
                )

        # The update manifest names each build's artifacts with the same hashes.
        if UPDATE_MANIFEST_TARGET in downloaded:
            with open(downloaded[UPDATE_MANIFEST_TARGET], "rb") as data:
                update_manifest = json.load(data)
            published = {(u["variant"], u["version"]): u for u in update_manifest["updates"]}
            for key, build in builds.items():
                entry = published.get(key)
                check(entry is not None, f"update manifest has {key[0]} {key[1]}")
                if entry is None:
                    continue
                by_target = {t["target"]: t for t in entry["targets"]}
                for artifact in build["artifacts"]:
                    name = f'{build["variant"]}-{build["version"]}-{artifact["name"]}'
                    listed = by_target.get(name)
                    check(
                        listed is not None
                        and listed["sha256"] == artifact["sha256"]
                        and listed["size"] == artifact["size"],
                        f"update manifest entry {name} matches the build",
                    )

    total = len(expected)
    if failures:
        print(f"FAIL: {len(failures)} check(s) failed")
        return 1
    print(f"all {total} build artifacts downloaded and verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
