#!/usr/bin/env bash
# Every test group of the project, each image built once (`make test`, and so
# CI). Versions 1.0.0, 2.0.0, 3.0.0 of qemu-x86_64 and qemu-aarch64 are built
# once into build/e2e (`make images`, throwaway keys) and shared by the image
# checks, the boot tests and the end-to-end tests.
#   1. the x86_64 images, then the aarch64 images (their binaries compiled
#      from the start, beside the x86_64 build);
#   2. then two VM workers take the VM test jobs (vm_jobs below: the e2e
#      suites split in five, the two boot test groups), longest first, so two
#      guests of one vCPU each run at a time (TCG on two cores; three guests
#      were tried: each job then cost 30-75% more CPU, and the run took longer);
#   3. niced, from the start: rustfmt; once the x86_64 images are built:
#      tests/agent, tests/repo, the TUF conformance suite (../shared's copy,
#      tests/tuf-conformance), image checks and bad input, the bit-identical
#      second build of 1.0.0 from a fresh clone; once the aarch64 images are
#      built: rpi4 with the k3s stand-in, clippy (in the images' target
#      directory, reusing their build scripts and proc macros), and last the
#      unit tests; compiling fills the CPU that image builds and guests leave
#      idle.
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
# The builder as the x86_64 images build it (the whole workspace) for every
# variant: the aarch64 images and rpi4 then find it built (Makefile).
export BUILDER_PACKAGES=--workspace
logs="$root/build/test-logs"
rm -rf "$logs"
mkdir -p "$logs"
stages="${RACKLET_STAGES:-$logs/stages.tsv}"
touch "$stages"
start="${RACKLET_START:-$(date +%s)}"
e2e="$root/build/e2e"
# The e2e jobs of one variant share each version's saved boot (test_e2e.py
# --saved-boots): booted from power-on once per run, not once per job.
saved_boots="$root/build/saved-boots"
rm -rf "$saved_boots"

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

# cpu_seconds FILE: the output of bash's `times` (the shell's and its children's
# user and system time, "1m2.5s 0m3.1s" a line) as whole seconds.
cpu_seconds() {
  python3 - "$1" <<'EOF'
import re, sys
try:
    text = open(sys.argv[1]).read()
except OSError:
    text = ""
print(round(sum(int(m) * 60 + float(s) for m, s in re.findall(r"(\d+)m([\d.]+)s", text))))
EOF
}

# stage NAME COMMAND...: run COMMAND with its output in $logs/NAME.log and a
# row (name, start offset, seconds, exit status, passed, failed) in $stages.
stage() {
  local name="$1"; shift
  local log="$logs/$name.log" began code
  began=$(date +%s)
  echo "=== $name: started at +$((began - start)) s (log: $log)"
  # The subshell's `times`: the CPU time (user + system) of everything the
  # stage ran, for the table's cpu column.
  ( "$@"; code=$?; times > "$log.cpu"; exit "$code" ) > "$log" 2>&1
  code=$?
  local now cpu; now=$(date +%s)
  read -r passed failed < <(counts "$log")
  cpu=$(cpu_seconds "$log.cpu")
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$((began - start))" "$((now - began))" "$code" "$passed" "$failed" "$cpu" >> "$stages"
  echo "=== $name: $( [ "$code" -eq 0 ] && echo ok || echo "FAILED (exit $code)") in $((now - began)) s ($cpu s CPU); $passed passed, $failed failed"
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

# lane NAME COMMAND... [-- NAME COMMAND...]...: stages one after another; its
# exit status is 1 when any of them failed.
lane() {
  local code=0 name
  while [ $# -gt 0 ]; do
    name="$1"; shift
    local command=()
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do command+=("$1"); shift; done
    [ $# -gt 0 ] && shift
    sequential "$name" "${command[@]}" || code=1
  done
  return "$code"
}

# The VM tests as jobs for two workers (two guests at a time). Each worker
# takes the first job in this order whose images are built, longest first
# (TCG emulates an aarch64 guest more slowly). On aarch64 one power cut a run, at a random moment
# (write, placed, first boot; `make e2e` cuts at all three): each aarch64 cut
# costs 4-12 minutes. The delta tests: the scenario's v1 -> v2 by delta and
# its repair through a tampered patch's fallback (both boot paths), and a
# node no delta starts from (e2e_delta_from_another_version, both paths).
# A job: name, the images it needs (x86 or arm), the command.
vm_jobs=(
  "e2e-arm-update|arm|python3 tests/vm/test_e2e.py --variant qemu-aarch64 --builds $e2e --no-build --saved-boots $saved_boots --only scenario"
  "e2e-arm-powercut|arm|python3 tests/vm/test_e2e.py --variant qemu-aarch64 --builds $e2e --no-build --saved-boots $saved_boots --only powercut,delta --count 1"
  "e2e-x86-update|x86|python3 tests/vm/test_e2e.py --variant qemu-x86_64 --builds $e2e --no-build --saved-boots $saved_boots --only scenario,waves"
  "e2e-x86-powercuts|x86|python3 tests/vm/test_e2e.py --variant qemu-x86_64 --builds $e2e --no-build --saved-boots $saved_boots --only powercut"
  "boot-x86|x86|python3 tests/vm/test_boot.py --build $e2e/v1 --only x86"
  "e2e-x86-attacks|x86|python3 tests/vm/test_e2e.py --variant qemu-x86_64 --builds $e2e --no-build --saved-boots $saved_boots --only attack,fault,offline,https,delta"
  "boot-arm|arm|python3 tests/vm/test_boot.py --build $e2e/v1 --only aarch64"
)
# One vCPU per guest: two guests on two cores (see tests/vm/harness.py).
export RACKLET_VM_CPUS=1
queue="$logs/vm-queue"
mkdir -p "$queue" "$queue.taken"
for index in "${!vm_jobs[@]}"; do
  printf '%s\n' "${vm_jobs[$index]}" > "$queue/$(printf '%02d' "$index")"
done

# vm_worker: run queued jobs until none is left. A job is taken by renaming
# its file (only one worker's rename succeeds).
vm_worker() {
  local code=0 job name needs command pending taken
  while :; do
    pending=0 taken=""
    for job in "$queue"/*; do
      [ -e "$job" ] || continue
      pending=1
      IFS='|' read -r name needs command < "$job"
      if [ -e "$logs/images-$needs.failed" ] || [ -e "$logs/images-$needs.built" ]; then
        mv "$job" "$queue.taken/" 2>/dev/null && { taken="$job"; break; }
      fi
    done
    if [ -n "$taken" ]; then
      if [ -e "$logs/images-$needs.failed" ]; then
        echo "=== $name: not run: the images it needs (images-$needs) failed"
        printf '%s\t%s\t0\t1\t0\t1\n' "$name" "$(( $(date +%s) - start ))" >> "$stages"
        code=1
      else
        # shellcheck disable=SC2086  # the command's words (no spaces in paths)
        sequential "$name" $command || code=1
      fi
    elif [ "$pending" -eq 0 ]; then
      return "$code"
    else
      sleep 5
    fi
  done
}

# images NAME VARIANT [nice]: build the images of VARIANT; leave a marker
# for the VM workers either way.
images() {
  local name="$1" variant="$2"; shift 2
  if sequential "images-$name" "$@" make images E2E_VARIANTS="$variant"; then
    touch "$logs/images-$name.built"
  else
    touch "$logs/images-$name.failed"
    return 1
  fi
}

# images_ready NAME: wait until `images NAME` has ended; fails if it failed.
images_ready() {
  until [ -e "$logs/images-$1.built" ] || [ -e "$logs/images-$1.failed" ]; do sleep 5; done
  [ -e "$logs/images-$1.built" ]
}

# Beside everything, niced: what needs no guest. rustfmt first, then what
# needs the x86_64 release binaries (tests/agent and tests/repo run those: no
# debug build of their own), the image checks, the bit-identical second build
# of 1.0.0 from a fresh clone. rpi4 with the k3s stand-in, clippy and the unit
# tests come last, after every image build (cargo's lock on target/image would
# make them and an image build wait for each other); the x86_64 image build
# compiled the same package set (Makefile: BUILDER_PACKAGES), so clippy finds
# its build scripts and proc macros built and the unit tests only the test
# harnesses left to compile. (clippy used to run first in target/debug: 237
# CPU-seconds while the image builds needed both cores.)
release="$root/target/image/$(rustc -vV | sed -n 's/^host: //p')/release"
niced_lane() {
  local code=0
  lane fmt nice -n 10 make fmt-check || code=1
  if images_ready x86; then
    lane agent env RACKLET_UPDATE="$release/racklet-update" RACKLET_IMAGE="$release/racklet-image" tests/agent/run.sh \
      -- repo env RACKLET_IMAGE="$release/racklet-image" tests/repo/run.sh \
      -- tuf-conformance env RACKLET_TUF_CONFORMANCE="$release/racklet-tuf-conformance" tests/tuf-conformance/run.sh \
      -- image-checks tests/image/run.sh --build "$e2e/v1" --only checks \
      -- reproducible nice -n 10 tests/image/run.sh --build "$e2e/v1" --only reproducible || code=1
  else
    echo "=== agent, repo, tuf-conformance, image-checks, reproducible: not run: images-x86 failed"; code=1
  fi
  # rpi4, clippy and the unit tests use target/image too: after the image
  # builds (cargo's lock would make them wait for each other).
  images_ready arm || true
  lane rpi4 nice -n 10 tests/image/run.sh --only rpi4 \
    -- clippy nice -n 10 make clippy \
    -- unit nice -n 10 make unit || code=1
  return "$code"
}

failures=0
niced_lane & niced=$!
# The aarch64 binaries compile from the start, beside the x86_64 images, in
# their own target directory (Makefile: image_dir): alone, the x86_64 build
# left about half a core idle (build scripts and links run one at a time).
stage binaries-arm make image-binaries variant=qemu-aarch64 & binaries=$!
# The images first, one variant at a time, before any guest: guests beside
# the aarch64 cross build made both slow (measured: the aarch64 images took
# 24 minutes beside two guests, the x86_64 update job 23 instead of 8), and
# the aarch64 jobs, the longest, then started last.
images x86 qemu-x86_64 || failures=$((failures + 1))
wait "$binaries" || failures=$((failures + 1))
shown binaries-arm
images arm qemu-aarch64 || failures=$((failures + 1))
vm_worker & workers=($!)
vm_worker & workers+=($!)
wait "$niced" || failures=$((failures + 1))
for pid in "${workers[@]}"; do
  wait "$pid" || failures=$((failures + 1))
done

rm -rf "$saved_boots"

# The table.
echo
echo "=== stages (wall time; offsets from the start of the run)"
python3 - "$stages" "$(( $(date +%s) - start ))" <<'EOF'
import sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
def minutes(seconds):
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"
print(f"{'stage':18} {'start':>7} {'time':>7} {'cpu':>7} {'result':8} {'passed':>7} {'failed':>7}")
cpu_total = 0
for row in rows:
    name, began, seconds, code, ok, bad = row[:6]
    cpu = int(row[6]) if len(row) > 6 and row[6] else 0
    cpu_total += cpu
    print(f"{name:18} {'+' + began + ' s':>7} {minutes(seconds):>7} {minutes(cpu) if cpu else '-':>7} "
          f"{'ok' if code == '0' else 'FAIL ' + code:8} {ok:>7} {bad:>7}")
total = int(sys.argv[2])
print(f"{'total':18} {'':>7} {minutes(total):>7} {minutes(cpu_total):>7} min (cpu: user + system time of the stages)")
EOF
echo
echo "=== images built (sha256 of disk.img; verity root hash from manifest.json)"
for manifest in "$e2e"/v*/*/manifest.json "$root"/build/rpi4/manifest.json; do
  [ -f "$manifest" ] || continue
  dir="$(dirname "$manifest")"
  python3 - "$manifest" "$(python3 tests/sparse_sha256.py "$dir/disk.img")" "${dir#"$root"/}" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"{sys.argv[3]:28} {m['variant']:13} {m['version']:6} disk.img {sys.argv[2]}  root hash {m['verity']['root_hash']}")
EOF
done
# What failed, last, so that the tail of a CI log says it: each failed
# stage's failure lines (our runners print `FAIL name: reason`; cargo prints
# `test name ... FAILED`), cut short, and the path of its whole log.
echo
while IFS=$'\t' read -r name _ _ code _ _; do
  [ "$code" = 0 ] && continue
  echo "=== $name failed (exit $code; whole log: ${logs#"$root"/}/$name.log):"
  grep -aE '^(FAIL|not ok|error(\[|:)|test .* FAILED|=== .*FAILED)|FAIL cut' "$logs/$name.log" 2>/dev/null \
    | cut -c1-400 | head -n 12 | sed 's/^/    /'
done < "$stages"
echo
read -r all_passed all_failed < <(awk -F"\t" '{p += $5; f += ($6 > 0 ? $6 : ($4 != 0 ? 1 : 0))} END {print p + 0, f + 0}' "$stages")
echo "stages failed: $failures"
echo "total: $all_passed passed, $all_failed failed"
[ "$failures" -eq 0 ]
