#!/usr/bin/env bash
# Two builds of the same commit must be bit-identical: disk.img, update/*,
# manifest.json and the SBOM. The second build runs from a fresh clone in
# another directory, with another umask, time zone and (later) clock time. Our
# own crates and racklet-init are compiled afresh there; the registry
# dependencies of the image binaries are taken from this checkout's
# target/image (copied, with our crates' artifacts removed), because cargo
# compiles them from the same sources with the same flags into the same bytes
# whatever the checkout (no checkout path in RUSTFLAGS: see
# image-builder/scripts/rustc-remap); compiling them again took about 12 of
# CI's CPU-minutes. RACKLET_REPRO_FRESH_DEPS=1 compiles everything afresh.
# On a difference, diffoscope shows where.
# Usage: reproducible.sh VARIANT REFERENCE_BUILD_DIR [K3S [MAKE_VARIABLE=VALUE...]]
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$here/lib.sh"
root="$(project_root)"

# reuse_dependencies CLONE: copy this checkout's compiled dependencies for the
# host (target/image/release: build scripts, proc macros; target/image/<host>:
# the x86_64 image binaries' dependencies) into CLONE, under cargo's locks (an
# aarch64 image build may be writing beside it), then remove our own crates'
# artifacts from the copy so that the second build compiles them from CLONE.
reuse_dependencies() {
  local clone="$1" host members
  host="$(rustc -vV | sed -n 's/^host: //p')"
  [ -d "$root/target/image/$host/release" ] || { echo "no $root/target/image/$host/release to reuse"; return 1; }
  mkdir -p "$clone/target/image/$host"
  touch "$root/target/image/release/.cargo-lock" "$root/target/image/$host/release/.cargo-lock"
  flock "$root/target/image/release/.cargo-lock" flock "$root/target/image/$host/release/.cargo-lock" \
    cp -a "$root/target/image/release" "$clone/target/image/" || return 1
  flock "$root/target/image/$host/release/.cargo-lock" \
    cp -a "$root/target/image/$host/release" "$clone/target/image/$host/" || return 1
  members="$(cd "$clone" && cargo metadata --no-deps --format-version 1 --offline \
    | python3 -c 'import json, sys; print(" ".join("-p " + p["name"] for p in json.load(sys.stdin)["packages"]))')"
  # shellcheck disable=SC2086  # one -p NAME per member
  (cd "$clone" && cargo clean --release --target "$host" --target-dir target/image $members)
}

check_reproducible() {
  local variant="$1" reference="$2" k3s="${3:-default}"
  local same_inputs=("${@:4}")  # more make variables the reference was built with (VERSION=, KEYS=)
  local other; other="$(mktemp -d /tmp/racklet-repro.XXXXXX)"
  if [ -n "$(git -C "$root" status --porcelain --untracked-files=no)" ]; then
    echo "note: $root has uncommitted changes; the clone builds the last commit" >&2
  fi
  git clone --quiet --no-hardlinks "$root" "$other/src"
  local log="$other/build.log"
  if [ "${RACKLET_REPRO_FRESH_DEPS:-0}" != 1 ]; then
    reuse_dependencies "$other/src" >> "$log" 2>&1 || echo "note: dependencies not reused (see $log)" >&2
  fi
  if ! (cd "$other/src" && umask 077 && TZ=Asia/Tokyo LC_ALL=C.UTF-8 RACKLET_NO_PROGRESS=1 \
        make variant="$variant" K3S="$k3s" OUTPUT="$other/out" "${same_inputs[@]}" build) >> "$log" 2>&1; then
    fail "$variant: second build from $other/src" "$(tail -n 20 "$log")"
    return
  fi
  local second="$other/out/$variant" differing=()
  for file in disk.img manifest.json sbom.cdx.json update/root.erofs.zst update/verity.img.zst update/uki-a.efi update/uki-b.efi update/uki-a.efi.zst update/uki-b.efi.zst; do
    cmp -s "$reference/$file" "$second/$file" || differing+=("$file")
  done
  if [ "${#differing[@]}" -eq 0 ]; then
    pass "$variant: two builds (other directory, umask 077, TZ=Asia/Tokyo) are bit-identical"
    rm -rf "$other"
  else
    fail "$variant: builds differ in ${differing[*]}" "see diffoscope below; second build kept in $other"
    for file in "${differing[@]}"; do
      if [ "$file" = disk.img ]; then
        # diffoscope on a whole multi-GB disk is too slow: compare partition by partition.
        for partition in esp root-a verity-a root-b verity-b data; do
          extract_partition "$reference/disk.img" "$partition" "$other/a-$partition.img"
          extract_partition "$second/disk.img" "$partition" "$other/b-$partition.img"
          if ! cmp -s "$other/a-$partition.img" "$other/b-$partition.img"; then
            echo "--- diffoscope disk.img partition $partition"
            timeout 600 diffoscope --no-progress --max-report-size 200000 "$other/a-$partition.img" "$other/b-$partition.img" 2>&1 | head -n 120
          fi
          rm -f "$other/a-$partition.img" "$other/b-$partition.img"
        done
        continue
      fi
      echo "--- diffoscope $file"
      timeout 600 diffoscope --no-progress --max-report-size 200000 "$reference/$file" "$second/$file" 2>&1 | head -n 120
    done
  fi
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  [ $# -ge 2 ] || { echo "usage: $0 VARIANT REFERENCE_BUILD_DIR [K3S [MAKE_VARIABLE=VALUE...]]" >&2; exit 2; }
  check_reproducible "$@"
  summary
fi
