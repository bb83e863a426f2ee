#!/usr/bin/env bash
# Install what the VM tests need: QEMU from bookworm-backports (the machine's
# qemu-utils 10 conflicts with bookworm's QEMU 7.2), OVMF, Debian's u-boot-qemu.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
need=()
for package in qemu-system-x86 qemu-system-arm ovmf u-boot-qemu qemu-efi-aarch64 mtools; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || need+=("$package")
done
[ "${#need[@]}" -eq 0 ] && exit 0
backports=/etc/apt/sources.list.d/bookworm-backports.sources
if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
  mirror=$(sed -n 's/^URIs: *\(.*\/debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
  [ -n "$mirror" ] || mirror=$(awk '$1=="deb" && $2 ~ /\/debian$/ {print $2; exit}' /etc/apt/sources.list)
  printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$mirror" > "$backports"
fi
apt-get update -q > /dev/null
apt-get install -y -q --no-install-recommends -t bookworm-backports qemu-system-x86 qemu-system-arm seabios > /dev/null
apt-get install -y -q --no-install-recommends ovmf u-boot-qemu qemu-efi-aarch64 mtools > /dev/null
