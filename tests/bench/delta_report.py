#!/usr/bin/env python3
"""The figures of tests/bench/delta.sh, from its work directory.

Per change (agent, package, kernel), published as 2.0.0 over the base 1.0.0:
  full bytes  = what a full install downloads: the compressed root, verity tree
                and the UKI of one slot (the build's manifest);
  delta bytes = what a node on slot A running 1.0.0 downloads instead: the root
                patch and the patch of slot B's UKI from slot A's (the publish
                report); a patch the publisher skipped counts as its full artifact
                (and a skipped root patch brings the verity tree back);
the ratio, the publish times with and without deltas, and the node's apply times
(delta_apply.py's JSON) when they were measured. The last three lines read
`delta NAME: D of F bytes (R %)`.

Usage: delta_report.py --work DIR --variant NAME --apply FILE [--apply-log FILE]
"""

import argparse
import json
import os

CHANGES = ["agent", "package", "kernel"]
GOALS = {"agent": 2.0, "package": 5.0, "kernel": None}


def load(path):
    with open(path) as source:
        return json.load(source)


def artifact(manifest, kind, slot=None):
    for entry in manifest["artifacts"]:
        if entry["kind"] == kind and entry.get("slot") == slot:
            return entry
    raise SystemExit(f"delta_report: no {kind} {slot or ''} artifact in the build's manifest")


def sizes(work, variant, name):
    manifest = load(os.path.join(work, "out", name, variant, "manifest.json"))
    root = artifact(manifest, "root-filesystem")
    verity = artifact(manifest, "verity-hash-tree")
    uki = artifact(manifest, "kernel-image", "b")
    full = root["size"] + verity["size"] + uki["size"]
    report = load(os.path.join(work, f"publish-{name}.json"))
    delta = next((d for d in report["deltas"] if d["from_version"] == "1.0.0"), None)
    patches = {p["rebuilds"]: p for p in (delta or {"patches": []})["patches"]}

    def shipped(key):
        patch = patches.get(key)
        return patch if patch and patch["skipped"] is None else None

    root_patch = shipped("root.erofs")
    uki_patch = shipped("uki-b.efi from uki-a.efi")
    delta_bytes = (root_patch["size"] if root_patch else root["size"] + verity["size"]) + (
        uki_patch["size"] if uki_patch else uki["size"])
    full_report = load(os.path.join(work, f"publish-{name}-full.json"))
    return {
        "full": full,
        "delta": delta_bytes,
        "root": root["size"],
        "verity": verity["size"],
        "uki": uki["size"],
        "root_patch": root_patch["size"] if root_patch else None,
        "uki_patch": uki_patch["size"] if uki_patch else None,
        "root_uncompressed": root["uncompressed_size"],
        "publish_delta": report["seconds"],
        "delta_seconds": report["delta_seconds"],
        "publish_full": full_report["seconds"],
        "skipped": [f'{p["rebuilds"]}: {p["skipped"]}' for p in patches.values() if p["skipped"]],
    }


def mb(value):
    return f"{value / 1e6:.2f} MB"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True)
    parser.add_argument("--variant", required=True)
    parser.add_argument("--apply", required=True)
    parser.add_argument("--apply-log")
    args = parser.parse_args()

    try:
        applied = load(args.apply)
    except (OSError, ValueError):
        applied = {}
    not_measured = applied.get("not_measured")
    if not applied and args.apply_log and os.path.exists(args.apply_log):
        with open(args.apply_log) as source:
            tail = source.read().strip().splitlines()[-3:]
        not_measured = "delta_apply.py failed: " + " / ".join(tail)

    lines = []
    for name in CHANGES:
        figures = sizes(args.work, args.variant, name)
        ratio = 100.0 * figures["delta"] / figures["full"]
        goal = GOALS[name]
        print(f"{name}: full {figures['full']} bytes ({mb(figures['full'])}: root "
              f"{mb(figures['root'])} of {mb(figures['root_uncompressed'])} erofs, verity "
              f"{mb(figures['verity'])}, UKI {mb(figures['uki'])})")
        print(f"{name}: delta {figures['delta']} bytes ({mb(figures['delta'])}: root patch "
              f"{figures['root_patch']}, UKI patch {figures['uki_patch']}), "
              f"{ratio:.2f} % of the full download"
              + (f" (goal <= {goal:g} %: {'met' if ratio <= goal else 'NOT met'})" if goal else ""))
        for skipped in figures["skipped"]:
            print(f"{name}: skipped by the publisher: {skipped}")
        print(f"{name}: publish {figures['publish_delta']:.1f} s with the delta "
              f"({figures['delta_seconds']:.1f} s computing it), "
              f"{figures['publish_full']:.1f} s without")
        times = applied.get(name)
        if times and "delta_seconds" in times:
            link = (f"over a {times['link_mbit']:g} Mbit/s link" if times.get("link_mbit")
                    else "served from 127.0.0.1 without a rate limit")
            print(f"{name}: apply on the node ({link}): delta {times['delta_seconds']:.2f} s "
                  f"(path: {times.get('delta_path', '?')}), full install "
                  f"{times['full_seconds']:.2f} s, ratio {times['delta_seconds'] / times['full_seconds']:.2f}"
                  f" (goal: delta no slower than full)")
        else:
            why = (times or {}).get("error") or not_measured or "no figures"
            print(f"{name}: apply: not measured ({why})")
        lines.append(f"delta {name}: {figures['delta']} of {figures['full']} bytes ({ratio:.2f} %)")
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
