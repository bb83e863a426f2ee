#!/usr/bin/env bash
# Install the host tools the image build needs, only those missing: Debian
# packages with apt-get, Rust targets with rustup. Idempotent; run as root.
set -euo pipefail

arch="${1:-x86_64}"
packages=(
  erofs-utils      # mkfs.erofs, fsck.erofs
  dosfstools       # mkfs.fat, fsck.fat
  mtools           # mmd, mcopy (deterministic FAT writes)
  gdisk            # sgdisk -v in tests
  fdisk            # sfdisk --json in tests
  cryptsetup-bin   # veritysetup verify in tests
  kmod             # depmod
  systemd          # systemctl --root, systemd-sysusers --root
  e2fsprogs        # mkfs.ext4, debugfs (the data partition)
  libc-bin         # ldconfig -r
  u-boot-tools     # mkimage (rpi4 boot.scr)
  binutils         # objcopy (UKI)
  cpio             # cpio -t in tests
  zstd
  diffoscope-minimal  # shows where two builds differ
)
if [ "$arch" = "aarch64" ]; then
  packages+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross binutils-aarch64-linux-gnu)
fi

missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "host-tools: installing ${missing[*]}" >&2
  if [ "$(id -u)" -ne 0 ]; then
    echo "host-tools: need root to apt-get install ${missing[*]}" >&2
    exit 2
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ "$arch" = "aarch64" ]; then
  rustup target list --installed | grep -qx aarch64-unknown-linux-gnu || rustup target add aarch64-unknown-linux-gnu
fi
