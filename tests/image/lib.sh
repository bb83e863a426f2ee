# Shared helpers for the image tests: counters, assertions, partition access.
# Each test calls `pass NAME` or `fail NAME WHY`; `summary` prints the closing
# line `N passed, N failed` and returns non-zero when anything failed.

passed=0
failed=0
failures=()

pass() { passed=$((passed + 1)); echo "ok   - $1"; }
fail() { failed=$((failed + 1)); failures+=("$1"); echo "FAIL - $1: $2"; }

# check NAME COMMAND...: passes when the command succeeds; shows its output tail when not.
check() {
  local name="$1"; shift
  local output
  if output=$("$@" 2>&1); then pass "$name"; else fail "$name" "$(echo "$output" | tail -n 15)"; fi
}

summary() {
  echo
  if [ "$failed" -gt 0 ]; then
    printf 'failed: %s\n' "${failures[@]}"
  fi
  echo "$passed passed, $failed failed"
  [ "$failed" -eq 0 ]
}

# json FILE EXPRESSION: read a value with python (no jq on a fresh machine).
json() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"; }

# partition_offset DISK NAME -> "start_bytes size_bytes" from sfdisk --json.
partition_extent() {
  sfdisk --json "$1" | python3 -c '
import json, sys
table = json.load(sys.stdin)["partitiontable"]
for p in table["partitions"]:
    if p.get("name") == sys.argv[1]:
        print(p["start"] * 512, p["size"] * 512)
        break
else:
    sys.exit("no partition named " + sys.argv[1])' "$2"
}

# extract_partition DISK NAME OUT: copy a partition out of a disk image.
extract_partition() {
  local start size
  read -r start size < <(partition_extent "$1" "$2")
  dd if="$1" of="$3" bs=1M iflag=skip_bytes,count_bytes skip="$start" count="$size" status=none conv=sparse
}

# The project's top directory and the builder binary.
project_root() { cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd; }
