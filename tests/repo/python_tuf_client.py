#!/usr/bin/env python3
"""A second TUF client for the repository `racklet-image publish` writes.

Bootstraps python-tuf's ngclient with a root the caller trusts (normally
metadata/1.root.json), refreshes from an HTTP server, downloads every target
listed in targets.json, and checks each artifact's sha256 against the build
manifests given on the command line (and the update manifest target against
those builds too). When more than one build is given, the delta index
(deltas.json) must list a delta between them; each patch it names must be a
signed target of the same size and sha256, and, applied with
`zstd -d --patch-from` to the older build's artifact (as downloaded), must
yield exactly the newer build's artifact.

Usage:
  python_tuf_client.py --metadata-url URL --targets-url URL --root FILE
                       [--expect-root-version N] BUILD_DIR...

Exits 0 when every check passes, 1 otherwise; prints one line per check.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

from tuf.api.metadata import Metadata, Root, Targets
from tuf.ngclient import Updater

UPDATE_MANIFEST_TARGET = "manifest.json"
DELTA_INDEX_TARGET = "deltas.json"


def artifact_for(build: dict, kind: str, slot=None):
    for artifact in build["artifacts"]:
        if artifact["kind"] == kind and artifact.get("slot") == slot:
            return artifact
    return None


def uncompressed_file(path: str, artifact: dict, scratch: str) -> str:
    """The artifact's bytes as a node holds them (decompressed if shipped compressed)."""
    if artifact["compression"] == "none":
        return path
    out = os.path.join(scratch, os.path.basename(path) + ".raw")
    subprocess.run(["zstd", "-d", "-q", "-f", path, "-o", out], check=True)
    return out


def check_deltas(index: dict, builds: dict, downloaded: dict, targets, scratch: str, check) -> int:
    """Every patch signed as listed and, applied to its source, the exact result."""
    applied = 0
    for delta in index["deltas"]:
        what = f'{delta["variant"]} {delta["from_version"]} -> {delta["to_version"]}'
        source_build = builds.get((delta["variant"], delta["from_version"]))
        result_build = builds.get((delta["variant"], delta["to_version"]))
        for patch in delta["patches"]:
            name = patch["target"]
            signed = targets.get(name)
            check(
                signed is not None
                and signed.length == patch["size"]
                and signed.hashes.get("sha256") == patch["sha256"],
                f"{what}: patch {name} is signed with the size and sha256 deltas.json gives",
            )
            if source_build is None or result_build is None or name not in downloaded:
                continue
            if patch["rebuilds"] == "root-filesystem":
                source = artifact_for(source_build, "root-filesystem")
                result = artifact_for(result_build, "root-filesystem")
            else:
                source = artifact_for(source_build, "kernel-image", patch["source_slot"])
                result = artifact_for(result_build, "kernel-image", patch["slot"])
            check(
                source is not None
                and result is not None
                and patch["source_sha256"] == source["uncompressed_sha256"]
                and patch["result_sha256"] == result["uncompressed_sha256"],
                f"{what}: {name} goes from the source build's artifact to the result build's",
            )
            if source is None or result is None:
                continue
            source_target = f'{delta["variant"]}-{delta["from_version"]}-{source["name"]}'
            if source_target not in downloaded:
                check(False, f"{what}: source target {source_target} was not downloaded")
                continue
            source_file = uncompressed_file(downloaded[source_target], source, scratch)
            output = os.path.join(scratch, name + ".applied")
            applying = subprocess.run(
                [
                    "zstd", "-d", "-q", "-f", f'--long={patch["window_log"]}',
                    f"--patch-from={source_file}", downloaded[name], "-o", output,
                ],
                capture_output=True,
                text=True,
            )
            ok = applying.returncode == 0 and sha256_of(output) == result["uncompressed_sha256"]
            check(
                ok,
                f"{what}: zstd --patch-from applies {name} ({patch['size']} bytes) to "
                f"{source['name']} and yields {result['name']} exactly {applying.stderr.strip()}",
            )
            applied += ok
    return applied


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

        # Deltas between the builds given: signed, and they rebuild the newer one.
        if len(builds) > 1:
            check(DELTA_INDEX_TARGET in downloaded, f"{DELTA_INDEX_TARGET} is a target")
        if DELTA_INDEX_TARGET in downloaded:
            with open(downloaded[DELTA_INDEX_TARGET], "rb") as data:
                index = json.load(data)
            pairs = {(d["variant"], d["from_version"], d["to_version"]) for d in index["deltas"]}
            ordered = sorted(builds, key=lambda key: [int(part) for part in key[1].split(".")])
            for older, newer in zip(ordered, ordered[1:]):
                check(
                    (older[0], older[1], newer[1]) in pairs,
                    f"{DELTA_INDEX_TARGET} lists {older[0]} {older[1]} -> {newer[1]}",
                )
            if shutil.which("zstd") is None:
                check(False, "the zstd tool is needed to apply the patches")
            else:
                applied = check_deltas(index, builds, downloaded, targets.targets, scratch, check)
                patches = sum(len(d["patches"]) for d in index["deltas"])
                print(
                    f"{DELTA_INDEX_TARGET}: {len(index['deltas'])} deltas, {patches} patches, "
                    f"{applied} applied with zstd --patch-from to the exact result"
                )

    total = len(expected)
    if failures:
        print(f"FAIL: {len(failures)} check(s) failed")
        return 1
    print(f"all {total} build artifacts downloaded and verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
