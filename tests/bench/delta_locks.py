#!/usr/bin/env python3
"""The package locks of tests/bench/delta.sh: a base and two upgrades of it.

The variant's lock pins the newest packages (`make lock`). The base lock steps
two things back to the newest older version the Debian archive still has (apt's
package lists, `apt-cache`): the openssl source package's binaries (libssl3,
openssl) and the kernel (the metapackage and the versioned image it depends
on). Then:
  package.lock = the base with openssl as locked (a security update),
  kernel.lock  = the base with the kernel as locked.
Each lock differs from the base in one upgrade only.

Usage: delta_locks.py LOCK OUT_DIR   (writes base.lock, package.lock, kernel.lock;
prints one line per lock saying what it changes)
"""

import os
import re
import subprocess
import sys

OPENSSL_BINARIES = ["libssl3", "openssl"]
KERNEL_META = {"qemu-x86_64": "linux-image-cloud-amd64"}


def apt_show(name, version):
    """Filename, Size, SHA256 and Depends of one version of a package (apt's lists)."""
    out = subprocess.run(["apt-cache", "show", f"{name}={version}"], capture_output=True,
                         text=True, check=True).stdout
    fields = {}
    for line in out.split("\n\n")[0].splitlines():
        if ": " in line and not line.startswith(" "):
            key, value = line.split(": ", 1)
            fields[key] = value
    return fields


def older_version(name, than):
    """The newest version of `name` apt knows below `than`."""
    out = subprocess.run(["apt-cache", "madison", name], capture_output=True, text=True,
                         check=True).stdout
    versions = [line.split("|")[1].strip() for line in out.splitlines() if "|" in line]
    older = [v for v in versions
             if subprocess.run(["dpkg", "--compare-versions", v, "lt", than]).returncode == 0]
    if not older:
        sys.exit(f"delta_locks: apt knows no version of {name} below {than} "
                 "(run apt-get update; bookworm's sources must be configured)")
    best = older[0]
    for candidate in older[1:]:
        if subprocess.run(["dpkg", "--compare-versions", candidate, "gt", best]).returncode == 0:
            best = candidate
    return best


def split_lock(text):
    """The header and each [[package]] block (as text)."""
    parts = text.split("\n[[package]]\n")
    return parts[0], parts[1:]


def field(block, key):
    match = re.search(rf'^{key} = "?([^"\n]*)"?$', block, re.M)
    return match.group(1) if match else None


def with_fields(block, **values):
    for key, value in values.items():
        rendered = str(value) if isinstance(value, int) else f'"{value}"'
        block, count = re.subn(rf"^{key} = .*$", f"{key} = {rendered}", block, flags=re.M)
        if count != 1:
            sys.exit(f"delta_locks: no '{key}' in a [[package]] block:\n{block}")
    return block


def downgraded(block, name, version):
    fields = apt_show(name, version)
    archive = "debian-security" if fields["Filename"].startswith("pool/updates/") else "debian"
    return with_fields(block, name=name, version=version, archive=archive,
                       filename=fields["Filename"], size=int(fields["Size"]),
                       sha256=fields["SHA256"])


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    lock_path, out_dir = sys.argv[1:]
    with open(lock_path) as source:
        text = source.read()
    header, blocks = split_lock(text)
    variant = field(header, "variant")
    meta = KERNEL_META.get(variant)
    if meta is None:
        sys.exit(f"delta_locks: no kernel metapackage known for variant {variant}")
    by_name = {field(block, "name"): index for index, block in enumerate(blocks)}

    # openssl: every binary of the source package one version back.
    openssl_new = field(blocks[by_name["libssl3"]], "version")
    openssl_old = older_version("libssl3", openssl_new)
    # The kernel: the metapackage one version back, and the image it depends on.
    kernel_new = field(blocks[by_name[meta]], "version")
    kernel_old = older_version(meta, kernel_new)
    depends = apt_show(meta, kernel_old)["Depends"]
    image_old = re.match(r"(linux-image-[^ ,]+)", depends).group(1)
    image_index = next(index for name, index in by_name.items()
                       if name.startswith("linux-image-") and name != meta)
    image_new = field(blocks[image_index], "name")

    def lock(openssl_version, kernel_version):
        changed = list(blocks)
        if openssl_version != openssl_new:
            for name in OPENSSL_BINARIES:
                changed[by_name[name]] = downgraded(blocks[by_name[name]], name, openssl_version)
        if kernel_version != kernel_new:
            changed[by_name[meta]] = downgraded(blocks[by_name[meta]], meta, kernel_version)
            changed[image_index] = downgraded(blocks[image_index], image_old, kernel_version)
        return header + "".join("\n[[package]]\n" + block for block in changed)

    os.makedirs(out_dir, exist_ok=True)
    for name, content, says in [
        ("base", lock(openssl_old, kernel_old),
         f"openssl {openssl_old}, {image_old} {kernel_old}"),
        ("package", lock(openssl_new, kernel_old),
         f"openssl {openssl_old} -> {openssl_new} (libssl3, openssl)"),
        ("kernel", lock(openssl_old, kernel_new),
         f"{image_old} {kernel_old} -> {image_new} {kernel_new}"),
    ]:
        with open(os.path.join(out_dir, f"{name}.lock"), "w") as out:
            out.write(content)
        print(f"{name}: {says}")


if __name__ == "__main__":
    main()
