#!/usr/bin/env bash
# Every test group of the project, each image built once (`make test`, and so
# CI). Order:
#   1. lint, unit tests, tests/repo, tests/agent                 (one at a time)
#   2. `make images`: versions 1.0.0, 2.0.0, 3.0.0 of qemu-x86_64 and
#      qemu-aarch64 into build/e2e, with throwaway keys           (once)
#   3. tests/image checks of build/e2e/v1/qemu-x86_64 and bad input
#   4. three lanes at once, each a sequence of stages:
#        vm-x86   test_boot.py (x86_64), then test_e2e.py --variant qemu-x86_64
#        vm-arm   test_boot.py (aarch64), then test_e2e.py --variant qemu-aarch64
#        builds   (nice 19) the second, bit-identical build of 1.0.0 from a
#                 fresh clone, then rpi4 with the k3s stand-in and its checks
#      The VM lanes run two guests at a time (TCG on two cores); the builds
#      lane uses what CPU the guests leave while they wait.
# Each stage's output goes to build/test-logs/<stage>.log (printed whole when
# its lane ends). The run ends with a table of each stage's wall time, the
# identity (sha256 of disk.img, verity root hash) of every image built, and a
# `total: N passed, N failed` line summed over the groups. Exit status: 0 only
# when every stage passed.
#
# Environment: RACKLET_STAGES (a file to append stage rows to; .ci/run passes
# one holding its own stages), RACKLET_START (epoch seconds the run started).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export RACKLET_NO_PROGRESS=1 CARGO_TERM_COLOR=never
logs="$root/build/test-logs"
rm -rf "$logs"
mkdir -p "$logs"
stages="${RACKLET_STAGES:-$logs/stages.tsv}"
touch "$stages"
start="${RACKLET_START:-$(date +%s)}"
e2e="$root/build/e2e"

# The "N passed, N failed" of a stage's log: the last such line of our
# runners, or cargo's `test result:` lines summed. Prints "PASSED FAILED".
counts() {
  python3 - "$1" <<'EOF'
import re, sys
text = open(sys.argv[1], errors="replace").read()
cargo = re.findall(r"^test result: \w+\. (\d+) passed; (\d+) failed", text, re.M)
ours = re.findall(r"^(?:\w+: )?(\d+) passed, (\d+) failed\s*$", text, re.M)
pairs = cargo + ours[-1:] if cargo else ours[-1:]
print(sum(int(p) for p, _ in pairs), sum(int(f) for _, f in pairs))
EOF
}

# stage NAME COMMAND...: run COMMAND with its output in $logs/NAME.log and a
# row (name, start offset, seconds, exit status, passed, failed) in $stages.
stage() {
  local name="$1"; shift
  local log="$logs/$name.log" began code
  began=$(date +%s)
  echo "=== $name: started at +$((began - start)) s (log: $log)"
  "$@" > "$log" 2>&1
  code=$?
  local now; now=$(date +%s)
  read -r passed failed < <(counts "$log")
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$((began - start))" "$((now - began))" "$code" "$passed" "$failed" >> "$stages"
  echo "=== $name: $( [ "$code" -eq 0 ] && echo ok || echo "FAILED (exit $code)") in $((now - began)) s; $passed passed, $failed failed"
  return "$code"
}

# shown NAME: print a finished stage's log (CI keeps only the output).
shown() { sed "s/^/[$1] /" "$logs/$1.log"; }

# sequential NAME COMMAND...: a stage whose log is printed when it ends.
sequential() {
  local name="$1" code=0
  stage "$@" || code=$?
  shown "$name"
  return "$code"
}

failures=0
sequential lint make lint || failures=$((failures + 1))
sequential unit env RACKLET_REQUIRE_PROMTOOL=1 cargo test --workspace --locked || failures=$((failures + 1))
sequential repo make test-repo || failures=$((failures + 1))
sequential agent make test-agent || failures=$((failures + 1))
if sequential images make images; then
  sequential image-checks tests/image/run.sh --build "$e2e/v1" --only checks || failures=$((failures + 1))

  # A lane: its stages one after another, in the background; each stage's
  # log is printed as soon as it ends.
  lane() {
    local code=0 stage_name
    while [ $# -gt 0 ]; do
      stage_name="$1"; shift
      local command=()
      while [ $# -gt 0 ] && [ "$1" != "--" ]; do command+=("$1"); shift; done
      [ $# -gt 0 ] && shift
      sequential "$stage_name" "${command[@]}" || code=1
    done
    return "$code"
  }
  lane boot-x86 python3 tests/vm/test_boot.py --build "$e2e/v1" --only x86 \
    -- e2e-x86 python3 tests/vm/test_e2e.py --variant qemu-x86_64 --builds "$e2e" --no-build &
  vm_x86=$!
  lane boot-arm python3 tests/vm/test_boot.py --build "$e2e/v1" --only aarch64 \
    -- e2e-arm python3 tests/vm/test_e2e.py --variant qemu-aarch64 --builds "$e2e" --no-build &
  vm_arm=$!
  lane reproducible nice -n 19 tests/image/run.sh --build "$e2e/v1" --only reproducible \
    -- rpi4 nice -n 19 tests/image/run.sh --only rpi4 &
  builds=$!
  for pid in "$vm_x86" "$vm_arm" "$builds"; do
    wait "$pid" || failures=$((failures + 1))
  done
else
  failures=$((failures + 1))
fi

# The table.
echo
echo "=== stages (wall time; offsets from the start of the run)"
python3 - "$stages" "$(( $(date +%s) - start ))" <<'EOF'
import sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
print(f"{'stage':16} {'start':>7} {'time':>9} {'result':8} {'passed':>7} {'failed':>7}")
passed = failed = 0
for name, began, seconds, code, ok, bad in rows:
    passed += int(ok); failed += int(bad)
    minutes = f"{int(seconds) // 60}:{int(seconds) % 60:02d}"
    print(f"{name:16} {'+' + began + ' s':>7} {minutes:>9} {'ok' if code == '0' else 'FAIL ' + code:8} {ok:>7} {bad:>7}")
total = int(sys.argv[2])
print(f"{'total':16} {'':>7} {total // 60}:{total % 60:02d} min")
EOF
echo
echo "=== images built (sha256 of disk.img; verity root hash from manifest.json)"
for manifest in "$e2e"/v*/*/manifest.json "$root"/build/rpi4/manifest.json; do
  [ -f "$manifest" ] || continue
  dir="$(dirname "$manifest")"
  python3 - "$manifest" "$(sha256sum "$dir/disk.img" | cut -c1-64)" "${dir#"$root"/}" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"{sys.argv[3]:28} {m['variant']:13} {m['version']:6} disk.img {sys.argv[2]}  root hash {m['verity']['root_hash']}")
EOF
done
echo
read -r all_passed all_failed < <(awk -F"\t" '{p += $5; f += ($6 > 0 ? $6 : ($4 != 0 ? 1 : 0))} END {print p + 0, f + 0}' "$stages")
echo "stages failed: $failures"
echo "total: $all_passed passed, $all_failed failed"
[ "$failures" -eq 0 ]
