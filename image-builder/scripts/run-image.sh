#!/usr/bin/env bash
# Boot build/<variant>/disk.img in QEMU on the serial console (Ctrl-A X quits).
# The image stays pristine: QEMU writes to a qcow2 overlay; UEFI variables are a
# fresh copy every time (a stale VARS file can drop OVMF into its shell).
set -euo pipefail
variant="${1:?usage: run-image.sh VARIANT}"
output="${OUTPUT:-build}"
disk="$output/$variant/disk.img"
[ -f "$disk" ] || { echo "no $disk; run 'make variant=$variant build' first" >&2; exit 2; }
arch=$(sed -n 's/^arch = "\(.*\)"/\1/p' "variants/$variant/variant.toml")
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
qemu-img create -q -f qcow2 -b "$(realpath "$disk")" -F raw "$scratch/overlay.qcow2"
case "$arch" in
  x86_64)
    cp /usr/share/OVMF/OVMF_VARS_4M.fd "$scratch/vars.fd"
    qemu-system-x86_64 -accel tcg -machine q35 -m 1024 -smp 2 -nographic \
      -drive if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd \
      -drive if=pflash,format=raw,file="$scratch/vars.fd" \
      -drive file="$scratch/overlay.qcow2",format=qcow2,if=virtio -nic user,model=virtio-net-pci ;;
  aarch64)
    qemu-system-aarch64 -accel tcg -machine virt -cpu cortex-a72 -m 1024 -smp 2 -nographic \
      -bios /usr/lib/u-boot/qemu_arm64/u-boot.bin \
      -drive file="$scratch/overlay.qcow2",format=qcow2,if=virtio -nic user,model=virtio-net-pci ;;
  *) echo "unknown arch '$arch' in variants/$variant/variant.toml" >&2; exit 2 ;;
esac
