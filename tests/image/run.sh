#!/usr/bin/env bash
# The image tests (`make test-image`): check an image with real tools, feed
# bad input, check that a second build is bit-identical, and build and check
# rpi4 with the k3s stand-in. Ends with the line `N passed, N failed`.
#
# Usage: tests/image/run.sh [--build DIR] [--keys DIR] [--only PART]...
#   --build DIR  check DIR/qemu-x86_64, an existing build (e.g. build/e2e/v1,
#                made by `make images`), instead of building build/qemu-x86_64;
#                its second build uses the version in its manifest.json
#   --keys DIR   the signing keys whose root.json that build embeds
#                (default: DIR/../keys with --build)
#   --only PART  checks (image checks, provision, flash, bad input), reproducible, rpi4;
#                repeatable (default: all three)
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$here/lib.sh"
source "$here/check-image.sh"
source "$here/bad-input.sh"
source "$here/reproducible.sh"
source "$here/provision.sh"
source "$here/flash.sh"
root="$(project_root)"
cd "$root"
export RACKLET_NO_PROGRESS=1

reference="" keys="" parts=()
while [ $# -gt 0 ]; do
  case "$1" in
    --build) reference="$(cd "$2" && pwd)"; shift 2 ;;
    --keys) keys="$(cd "$2" && pwd)"; shift 2 ;;
    --only) parts+=("$2"); shift 2 ;;
    -h|--help) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "tests/image/run.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[ "${#parts[@]}" -gt 0 ] || parts=(checks reproducible rpi4)
wants() { [[ " ${parts[*]} " == *" $1 "* ]]; }
if [ -n "$reference" ] && [ -z "$keys" ] && [ -f "$reference/../keys/root.json" ]; then
  keys="$(cd "$reference/../keys" && pwd)"
fi

build() {
  local variant="$1" k3s="${2:-default}" log
  log="$(mktemp)"
  if make variant="$variant" K3S="$k3s" build > "$log" 2>&1; then
    pass "make variant=$variant K3S=$k3s build"
  else
    fail "make variant=$variant K3S=$k3s build" "$(tail -n 30 "$log")"
    return 1
  fi
}

# The qemu-x86_64 build to check: the one given, or a new one.
x86=""
if wants checks || wants reproducible; then
  if [ -n "$reference" ]; then
    x86="$reference/qemu-x86_64"
    [ -f "$x86/manifest.json" ] || { fail "the build to check" "$x86/manifest.json is missing (run make images)"; x86=""; }
  elif build qemu-x86_64; then
    x86="$root/build/qemu-x86_64"
  fi
fi
if [ -n "$x86" ]; then
  if wants checks; then
    check_image "$x86"
    check_provision "$x86"
    check_flash "$x86"
    run_bad_input_tests
  fi
  if wants reproducible; then
    same_inputs=()
    if [ -n "$reference" ]; then
      same_inputs=("VERSION=$(json "$x86/manifest.json" 'd["version"]')" "EXTRA_RECIPES=")
      [ -n "$keys" ] && same_inputs+=("KEYS=$keys")
    fi
    check_reproducible qemu-x86_64 "$x86" default "${same_inputs[@]}"
  fi
fi
if wants rpi4 && build rpi4 stand-in; then
  check_image build/rpi4
  check "rpi4: the manifest says k3s is the stand-in" python3 -c '
import json; m = json.load(open("build/rpi4/manifest.json"))
assert m["k3s"]["kind"] == "stand-in" and m["k3s"]["name"] == "k3s-stand-in", m["k3s"]'
  check "rpi4: os-release says the stand-in is not k3s" bash -c '
    objcopy -O binary --only-section=.osrel build/rpi4/update/uki-a.efi /dev/stdout 2>/dev/null ||
    aarch64-linux-gnu-objcopy -O binary --only-section=.osrel build/rpi4/update/uki-a.efi /dev/stdout' \
    | grep -q 'RACKLET_K3S="STAND-IN k3s-stand-in (not k3s; for tests only)"'
  python3 "$here/check_rpi4_esp.py" build/rpi4 && pass "rpi4: the ESP holds what the Pi 4 firmware and U-Boot need" \
    || fail "rpi4: ESP contents" "see above"
  check "rpi4: the root has the modules a Pi 4 needs, none of kernel.omit_modules" \
    python3 "$here/check_rpi4_modules.py" build/rpi4
fi
summary
