#!/usr/bin/env bash
# The image tests (`make test-image`): build the images, check them with real
# tools, feed bad input, and check that a second build is bit-identical.
# Ends with the line `N passed, N failed`.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$here/lib.sh"
source "$here/check-image.sh"
source "$here/bad-input.sh"
source "$here/reproducible.sh"
root="$(project_root)"
cd "$root"
export RACKLET_NO_PROGRESS=1

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

if build qemu-x86_64; then
  check_image build/qemu-x86_64
  run_bad_input_tests
  check_reproducible qemu-x86_64 "$root/build/qemu-x86_64"
fi
if build rpi4 stand-in; then
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
fi
summary
