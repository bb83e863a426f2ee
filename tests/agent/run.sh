#!/usr/bin/env bash
# End-to-end tests of the update agent: racklet-update daemon on a private
# D-Bus, a GPT disk image file, an ESP directory, and a TUF repository that
# racklet-image publishes from synthetic builds with real dm-verity trees,
# served on 127.0.0.1. See test_agent.py for the cases.
#
# Usage: tests/agent/run.sh [-k SUBSTRING]... [--keep]
# Environment: RACKLET_UPDATE / RACKLET_IMAGE to skip the cargo build.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

if [ -z "${RACKLET_UPDATE:-}" ] || [ -z "${RACKLET_IMAGE:-}" ]; then
  echo "building racklet-update and racklet-image (cargo build -p update-agent -p image-builder)"
  (cd "$root" && cargo build --quiet -p update-agent -p image-builder --bin racklet-update --bin racklet-image) || {
    echo "FAIL: tests/agent: cargo build failed"
    exit 1
  }
  export RACKLET_UPDATE="${RACKLET_UPDATE:-$root/target/debug/racklet-update}"
  export RACKLET_IMAGE="${RACKLET_IMAGE:-$root/target/debug/racklet-image}"
fi

# Tools: command -> Debian package.
declare -A tools=(
  [dbus-daemon]=dbus-daemon
  [busctl]=systemd
  [dbus-send]=dbus-bin
  [veritysetup]=cryptsetup-bin
  [sgdisk]=gdisk
  [sfdisk]=fdisk
  [zstd]=zstd
  [faketime]=faketime
  [python3]=python3
  [setpriv]=util-linux
)
missing=()
for tool in "${!tools[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${tools[$tool]}")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "tests/agent: installing ${missing[*]}" >&2
  if [ "$(id -u)" -ne 0 ]; then
    echo "FAIL: tests/agent: need root to apt-get install ${missing[*]}"
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

exec python3 "$here/test_agent.py" "$@"
