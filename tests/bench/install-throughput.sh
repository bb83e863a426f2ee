#!/usr/bin/env bash
# Benchmark (not a test): how fast the update agent installs a large update, as
# a ratio to `zstd -dc root.zst | dd of=slot bs=1M conv=fsync` on the same data
# and the same kind of slot file, and the daemon's peak RSS at each size (it
# must not grow with the image). Goals (issue 16): the root write phase >= 0.9x
# and the whole apply (TUF metadata to "installed", with the read-back verify)
# >= 0.5x the pipe; the last lines print both ratios beside their goals.
#
# Per size: a root of SIZE_MIB MiB of compressible data, its dm-verity tree
# (veritysetup format), zstd -3 like real builds, published by racklet-image as
# 2.0.0 for a node running 1.0.0 and served by `python3 -m http.server` on
# 127.0.0.1; then, alternating, RUNS times each: the pipe, the pipe with 4 MiB
# writes (a control: the agent's write size), the pipe fed by curl from the
# same server, and `racklet-update apply` against a fresh daemon on a private
# D-Bus writing into a fresh sparse GPT disk image file. Prints medians, the
# agent's phases (from its time-stamped log), CPU and RSS, and last lines
# `write phase: ratio R at N MiB (...; goal >= 0.9), peak RSS ...` and
# `whole apply: ratio R at N MiB (...; goal >= 0.5)`. Details in
# install_throughput.py beside this script.
#
# Usage: tests/bench/install-throughput.sh [SIZE_MIB...]   (default: 256 1024)
# Environment:
#   RACKLET_BENCH_RUNS=3        runs per contender and size (medians are printed)
#   RACKLET_BENCH_DATA=usr      usr: a tar stream of /usr (zstd -3: ~2.4x);
#                               erofs: the real build/*/update/root.erofs.zst's
#                               root repeated (LZ4HC inside, zstd -3: ~1.5x)
#   RACKLET_BENCH_PERF=1        perf-record the daemon in the last run of each size
#   RACKLET_BENCH_TMP=/tmp      where the work directory goes (needs ~3x the
#                               largest size free; removed at the end)
#   RACKLET_BENCH_DROP_CACHES=0 only sync before each run (default: also drop
#                               the page cache when /proc/sys/vm/drop_caches is writable)
#   RACKLET_BENCH_LOG=info      the daemon's RACKLET_LOG (its log is time-stamped
#                               line by line; debug shows every HTTP request)
#   RACKLET_BENCH_KEEP=1        keep the work directory (daemon logs, perf data)
#   RACKLET_BENCH_COMPARE=BIN   a second racklet-update ("B", e.g. a candidate
#                               fix), run right after the first in every round
#   RACKLET_UPDATE, RACKLET_IMAGE   prebuilt binaries (skips the cargo build)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
sizes=("$@")
[ "${#sizes[@]}" -gt 0 ] || sizes=(256 1024)
for size in "${sizes[@]}"; do
  [[ "$size" =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [SIZE_MIB...]" >&2; exit 2; }
done

for tool in dbus-daemon veritysetup sgdisk sfdisk zstd curl dd python3 /usr/bin/time; do
  command -v "$tool" >/dev/null 2>&1 || { echo "install-throughput: $tool is missing" >&2; exit 1; }
done
perf_flag=()
if [ "${RACKLET_BENCH_PERF:-0}" = 1 ]; then
  command -v perf >/dev/null 2>&1 || { echo "install-throughput: RACKLET_BENCH_PERF=1 needs perf" >&2; exit 1; }
  perf_flag=(--perf)
fi

if [ -z "${RACKLET_UPDATE:-}" ] || [ -z "${RACKLET_IMAGE:-}" ]; then
  echo "building release binaries (cargo build --release -p update-agent -p image-builder)" >&2
  (cd "$root" && cargo build --quiet --release -p update-agent -p image-builder \
    --bin racklet-update --bin racklet-image)
  RACKLET_UPDATE="${RACKLET_UPDATE:-$root/target/release/racklet-update}"
  RACKLET_IMAGE="${RACKLET_IMAGE:-$root/target/release/racklet-image}"
fi

work="$(mktemp -d "${RACKLET_BENCH_TMP:-/tmp}/racklet-bench-install.XXXXXX")"
drop_flag=()
[ "${RACKLET_BENCH_DROP_CACHES:-1}" != 0 ] || drop_flag=(--no-drop-caches)
compare_flag=()
[ -z "${RACKLET_BENCH_COMPARE:-}" ] || compare_flag=(--compare "$RACKLET_BENCH_COMPARE")
keep_flag=()
if [ "${RACKLET_BENCH_KEEP:-0}" = 1 ]; then
  keep_flag=(--keep)
  echo "keeping the work directory $work" >&2
else
  trap 'rm -rf "$work"' EXIT
fi
python3 "$here/install_throughput.py" --update "$RACKLET_UPDATE" --image "$RACKLET_IMAGE" \
  --work "$work" --data "${RACKLET_BENCH_DATA:-usr}" --runs "${RACKLET_BENCH_RUNS:-3}" \
  "${perf_flag[@]}" "${drop_flag[@]}" "${compare_flag[@]}" "${keep_flag[@]}" "${sizes[@]}"
