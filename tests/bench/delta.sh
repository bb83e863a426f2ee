#!/usr/bin/env bash
# Benchmark (not a test): how small a delta update is against the full download,
# for three real changes of a base image (issue 16), and how long the node takes
# to apply it against a full install.
#
# From the committed tree (git archive HEAD, so other work in progress is left
# out), with the qemu-x86_64 variant:
#   base     the variant's lock with openssl and the kernel one version back
#            (the newest older versions apt knows: tests/bench/delta_locks.py)
#   agent    the base with only the update agent's code changed (its --help text)
#   package  the base with openssl's security update (libssl3, openssl)
#   kernel   the base with the kernel's update
# The base is published as 1.0.0, each change as 2.0.0 (into a copy of the base's
# repository), with racklet-image's default delta settings; sizes come from the
# publish report. Full bytes: what a full install downloads (the compressed
# root, verity tree and one UKI); delta bytes: the root patch and the UKI patch
# (the verity tree is computed on the node).
#
# The node's apply time: tests/bench/delta_apply.py, the agent's daemon on a
# private D-Bus with slot A holding the base (root and UKI), `racklet-update
# apply` from a repository with the delta and from one without (a full install).
#
# The last three lines read `delta agent: D of F bytes (R %)`, `delta package:
# ...`, `delta kernel: ...` (goals: agent <= 2 %, package <= 5 %).
#
# Usage: tests/bench/delta.sh
# Environment:
#   RACKLET_BENCH_TMP=/tmp     where the work directory goes (~6 GB: four builds)
#   RACKLET_BENCH_KEEP=1       keep the work directory
#   RACKLET_BENCH_BUILDS=DIR   reuse a kept work directory's builds (DIR/out/*)
#   RACKLET_BENCH_RUNS=3       apply runs per path (medians are printed)
#   RACKLET_BENCH_LINK_MBIT=0  pace the node's downloads at this rate (0: no limit,
#                              so a full install's download costs next to nothing)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
variant=qemu-x86_64
triple=x86_64-unknown-linux-gnu

for tool in git zstd python3 apt-cache dpkg nice mkfs.erofs; do
  command -v "$tool" >/dev/null 2>&1 || { echo "delta bench: $tool is missing" >&2; exit 1; }
done

work="$(mktemp -d "${RACKLET_BENCH_TMP:-/tmp}/racklet-delta-bench.XXXXXX")"
cleanup() {
  if [ "${RACKLET_BENCH_KEEP:-0}" = 1 ]; then
    echo "kept $work" >&2
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT
log() { echo "delta bench: $*" >&2; }
# Builds and publishes never need the time-stamped progress bars.
export RACKLET_NO_PROGRESS=1 RACKLET_LOG=warn
# Each build's timestamps come from its version, as for two releases.
unset SOURCE_DATE_EPOCH

src="$work/src"
mkdir -p "$src"
git -C "$root" archive HEAD | tar -x -C "$src"
log "sources: $(git -C "$root" rev-parse --short HEAD) in $src"

# --- the locks ------------------------------------------------------------------
lock="$src/variants/$variant/packages.lock"
python3 "$here/delta_locks.py" "$lock" "$work/locks" | sed 's/^/delta bench: lock /' >&2

# --- the binaries: the base's, and the agent's with a harmless change --------------
# In copies of the image target directories (dependencies compiled already), so
# the tree's own target/image is not overwritten by these builds.
builds_from="${RACKLET_BENCH_BUILDS:-}"
if [ -z "$builds_from" ]; then
  for dir in image init; do
    if [ -d "$root/target/$dir" ]; then
      cp -a "$root/target/$dir" "$work/target-$dir"
    fi
  done
  cargo_env=(env RUSTC_WRAPPER="$src/image-builder/scripts/rustc-remap"
    RACKLET_REMAP_SOURCE="$src" RACKLET_REMAP_CARGO_HOME="${CARGO_HOME:-$HOME/.cargo}")
  binaries() { # DESTINATION
    (cd "$src" && nice "${cargo_env[@]}" cargo build --quiet --release --locked --workspace \
      --target "$triple" --target-dir "$work/target-image") >&2
    mkdir -p "$1"
    cp "$work/target-image/$triple/release/"{racklet-update,racklet-node,racklet-image} "$1/"
  }
  log "building the image binaries (cargo build --release --workspace)"
  binaries "$work/bin-base"
  (cd "$src" && nice env RUSTFLAGS="-C target-feature=+crt-static" "${cargo_env[@]}" \
    cargo build --quiet --release --locked -p racklet-init --target "$triple" \
    --target-dir "$work/target-init") >&2
  cp "$work/target-init/$triple/release/racklet-init" "$work/racklet-init"
  python3 - "$src/update-agent/src/cli.rs" <<'EOF'
import sys
path = sys.argv[1]
text = open(path).read()
old = 'about = "Racklet OS A/B update agent"'
if text.count(old) != 1:
    sys.exit(f"delta bench: {path} has no {old!r} to change")
open(path, "w").write(text.replace(old, 'about = "Racklet OS A/B update agent (delta bench build)"'))
EOF
  log "building the agent with a changed --help text"
  binaries "$work/bin-agent"
  cmp -s "$work/bin-base/racklet-update" "$work/bin-agent/racklet-update" &&
    { echo "delta bench: the agent's change did not change its binary" >&2; exit 1; }
  cp "$work/bin-base/racklet-node" "$work/bin-agent/racklet-node"
  rm -rf "$work/target-image" "$work/target-init"
fi
bins="${builds_from:-$work}"
builder="$bins/bin-base/racklet-image"

# --- the four builds ----------------------------------------------------------------
build() { # NAME LOCK BINARIES VERSION
  local name="$1" started
  cp "$work/locks/$2.lock" "$lock"
  started=$(date +%s)
  nice "$builder" build --project "$src" --variant "$variant" --output "$work/out/$name" \
    --binaries "$bins/$3" --init "$bins/racklet-init" --image-version "$4" \
    >"$work/build-$name.log" 2>&1 || { cat "$work/build-$name.log" >&2; exit 1; }
  log "built $name ($4) in $(($(date +%s) - started)) s"
}
if [ -n "$builds_from" ]; then
  mkdir -p "$work/out"
  for name in base agent package kernel; do
    cp -a "$builds_from/out/$name" "$work/out/$name"
  done
else
  build base base bin-base 1.0.0
  build agent base bin-agent 2.0.0
  build package package bin-base 2.0.0
  build kernel kernel bin-base 2.0.0
fi

# --- publish: the base, then each change with its delta --------------------------------
keys="$work/keys"
"$builder" keys generate --dir "$keys" >/dev/null 2>&1
"$builder" publish --build "$work/out/base/$variant" --repo "$work/repo-base" --keys "$keys" \
  --delta-sources 0 >/dev/null 2>&1
for name in agent package kernel; do
  cp -a "$work/repo-base" "$work/repo-$name"
  cp -a "$work/repo-base" "$work/repo-$name-full"
  "$builder" --json publish --build "$work/out/$name/$variant" --repo "$work/repo-$name" \
    --keys "$keys" >"$work/publish-$name.json" 2>"$work/publish-$name.log" ||
    { cat "$work/publish-$name.log" >&2; exit 1; }
  "$builder" --json publish --build "$work/out/$name/$variant" --repo "$work/repo-$name-full" \
    --keys "$keys" --delta-sources 0 >"$work/publish-$name-full.json" 2>/dev/null
done

# --- the node's apply time, then the figures ------------------------------------------
python3 "$here/delta_apply.py" --work "$work" --variant "$variant" \
  --update "$bins/bin-base/racklet-update" --runs "${RACKLET_BENCH_RUNS:-3}" \
  --link-mbit "${RACKLET_BENCH_LINK_MBIT:-0}" \
  >"$work/apply.json" 2>"$work/apply.log" || true
python3 "$here/delta_report.py" --work "$work" --variant "$variant" --apply "$work/apply.json" \
  --apply-log "$work/apply.log"
