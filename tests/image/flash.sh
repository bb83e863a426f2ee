#!/usr/bin/env bash
# `racklet-image flash` onto a loop device standing in for a card: the card
# holds the image byte for byte afterwards (cmp), including zeros where the
# card had old bytes and the image has holes. (On a card larger than the
# image the backup GPT sits where the image ended, as after any dd; the first
# boot's systemd-repart moves it: test_boot's x86_boot_verified_root_then_reboots.)
# Refused before anything is written: a regular file, a card
# smaller than the image, a mounted disk, and the disk the host runs from.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$here/lib.sh"

# check_flash BUILD_DIR
check_flash() {
  local build="$1" root builder scratch image size card small mounted output host_disk
  root="$(project_root)"
  builder="${RACKLET_IMAGE:-$root/target/release/racklet-image}"
  if ! losetup -f > /dev/null 2>&1; then
    fail "flash: a loop device" "losetup -f found no free loop device (run as root)"
    return
  fi
  scratch="$(mktemp -d /tmp/racklet-flash.XXXXXX)"
  image="$build/disk.img"
  size=$(stat -c %s "$image")

  # A "card" 16 MiB larger than the image, full of old bytes (0xAA) where
  # the image has data and where it has holes (in the first 64 MiB).
  truncate -s $((size + 16 * 1024 * 1024)) "$scratch/card.raw"
  head -c $((64 * 1024 * 1024)) /dev/zero | tr '\0' '\252' | dd of="$scratch/card.raw" conv=notrunc status=none
  card="$(losetup -f --show "$scratch/card.raw")"
  if output=$("$builder" --json flash --disk "$image" --device "$card" 2> "$scratch/flash.err"); then
    if [ "$(echo "$output" | python3 -c 'import json,sys; print(json.load(sys.stdin)["sha256"])')" = \
         "$(python3 "$root/tests/sparse_sha256.py" "$image")" ]; then
      pass "flash: writes $(basename "$image") to $card and reports its sha256"
    else
      fail "flash: report" "$output"
    fi
  else
    fail "flash: onto a loop device" "$(tail -n 5 "$scratch/flash.err")"
  fi
  check "flash: the card holds the image byte for byte (holes as zeros)" cmp -n "$size" "$image" "$card"
  losetup -d "$card"

  # Refusals: nothing written.
  refused() {  # NAME EXPECTED_TEXT DEVICE
    local out
    if out=$("$builder" flash --disk "$image" --device "$3" 2>&1); then
      fail "flash: refuses $1" "it succeeded: $out"
    elif echo "$out" | grep -q "$2"; then
      pass "flash: refuses $1 ($(echo "$out" | tail -n 1 | cut -c1-140))"
    else
      fail "flash: refuses $1" "expected '$2' in: $out"
    fi
  }
  refused "a regular file" "not a block device" "$scratch/card.raw"
  truncate -s $((size - 1024 * 1024)) "$scratch/small.raw"
  small="$(losetup -f --show "$scratch/small.raw")"
  refused "a card smaller than the image" "smaller than the image" "$small"
  losetup -d "$small"
  # Large enough for the image: refused for the mount alone.
  truncate -s $((size + 1024 * 1024)) "$scratch/mounted.raw"
  mkfs.ext4 -q "$scratch/mounted.raw"
  mounted="$(losetup -f --show "$scratch/mounted.raw")"
  mkdir -p "$scratch/mnt"
  if mount "$mounted" "$scratch/mnt" 2> /dev/null; then
    refused "a mounted disk" "the host uses this disk" "$mounted"
    umount "$scratch/mnt"
  else
    fail "flash: refuses a mounted disk" "could not mount an ext4 loop device here"
  fi
  losetup -d "$mounted"
  # The disk / lives on (the check refuses it before opening it for writing,
  # and the kernel's O_EXCL would refuse a mounted disk too).
  host_disk="$(lsblk -n -p -o PKNAME "$(findmnt -n -o SOURCE /)" 2> /dev/null | head -n 1)"
  [ -n "$host_disk" ] || host_disk="$(findmnt -n -o SOURCE /)"
  if [ -b "$host_disk" ]; then
    refused "the disk the host runs from ($host_disk)" "the host uses this disk" "$host_disk"
  else
    echo "skip - flash: the host's / is not on a block device here ($host_disk)"
  fi
  rm -rf "$scratch"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  [ $# -eq 1 ] || { echo "usage: $0 BUILD_DIR (e.g. build/e2e/v1/qemu-x86_64)" >&2; exit 2; }
  check_flash "$1"
  summary
fi
