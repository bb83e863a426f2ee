#!/usr/bin/env bash
# Benchmark (not a test): cold and warm build times of `make build`, and their ratio.
#   cold: a fresh clone (empty cargo target directories) and an empty download cache;
#   warm: the same clone again after a change to the update agent's code only.
# Usage: tests/bench/build-times.sh [VARIANT]   (default qemu-x86_64)
set -euo pipefail
variant="${1:-qemu-x86_64}"
root="$(cd "$(dirname "$0")/../.." && pwd)"
work="$(mktemp -d /tmp/racklet-bench.XXXXXX)"
trap 'rm -rf "$work"' EXIT
git clone --quiet "$root" "$work/src"
export RACKLET_CACHE="$work/cache" RACKLET_NO_PROGRESS=1

timed() {
  local started ended
  started=$(date +%s%N)
  (cd "$work/src" && make variant="$variant" OUTPUT="$work/out" build) > "$work/$1.log" 2>&1
  ended=$(date +%s%N)
  python3 -c "print(($ended - $started) / 1e9)"
}

cold=$(timed cold)
echo "// benchmark change: $(date +%s%N)" >> "$work/src/update-agent/src/main.rs"
warm=$(timed warm)
printf 'variant:           %s\n' "$variant"
printf 'cold build:        %6.1f s  (fresh clone, empty download cache)\n' "$cold"
printf 'warm build:        %6.1f s  (update agent source changed)\n' "$warm"
printf 'warm/cold ratio:   %6.3f\n' "$(python3 -c "print($warm / $cold)")"
