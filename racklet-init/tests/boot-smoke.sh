#!/usr/bin/env bash
# boot-smoke.sh — boot racklet-init under QEMU (TCG) against a hand-made
# dm-verity disk and check the three outcomes that matter:
#
#   (a) good root        -> the root's /sbin/init prints RACKLET-ROOT-OK and powers off;
#   (b) wrong roothash=  -> exactly one "racklet-init: FATAL:" line, then a reboot
#                           (QEMU runs with -no-reboot, so it exits);
#   (c) a flipped byte in a file's data on the root -> the kernel logs dm-verity
#                           corruption when the file is read and restarts
#                           (restart_on_corruption), so RACKLET-ROOT-OK never shows.
#
# A developer tool, not part of `cargo test`: it needs root-free but host-heavy tools
# and ~2 minutes. The project's real VM tests will replace it.
#
# Needs (Debian bookworm package names): qemu-system-x86 (bookworm-backports, see
# /work/shared/field-notes.md), gdisk (sgdisk), cryptsetup-bin (veritysetup),
# erofs-utils, cpio, kmod (depmod, modprobe), busybox-static, and apt access to
# download Debian's cloud kernel. Always uses `-accel tcg` (KVM hangs on these hosts).
#
# Everything it downloads or writes goes to $RACKLET_INIT_TEST_DIR
# (default /tmp/racklet-init-test); nothing is written into the repository except the
# cargo build in target/init.
#
# Usage: racklet-init/tests/boot-smoke.sh [good|wrong-hash|corrupt ...]
#        (default: all three). Logs: $RACKLET_INIT_TEST_DIR/boot-<case>.log
#
# Environment:
#   RACKLET_INIT_TEST_DIR  work directory (default /tmp/racklet-init-test)
#   RACKLET_INIT_BIN       a prebuilt static racklet-init (default: build it)
#   KERNEL_PACKAGE         kernel package to download (default: what
#                          linux-image-cloud-amd64 depends on)
#   QEMU_TIMEOUT           seconds per boot before giving up (default 300)

set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WORK="${RACKLET_INIT_TEST_DIR:-/tmp/racklet-init-test}"
QEMU_TIMEOUT="${QEMU_TIMEOUT:-300}"
TARGET=x86_64-unknown-linux-gnu
# Modules the initramfs needs (their dependency closure is added by modprobe).
WANTED_MODULES=(virtio_pci virtio_blk dm-verity erofs)
# DPS partition type GUIDs (x86-64 root and root verity) and a plain ESP type.
ROOT_TYPE=4f68bce3-e8cd-4db1-96e7-fbcaf984b709
VERITY_TYPE=2c7357ed-ebd2-46d9-aec1-23d437ec2bf5
ESP_TYPE=c12a7328-f81f-11d2-ba4b-00a0c93ec93b
# Text that fills the canary file; corruption case (c) flips its first byte on disk.
CANARY_MARKER=CANARYDATA
SECTOR=512
PARTITION_ALIGN_SECTORS=2048

log() { printf 'boot-smoke: %s\n' "$*" >&2; }
die() { printf 'boot-smoke: ERROR: %s\n' "$*" >&2; exit 1; }

need_tools() {
    local tool missing=()
    for tool in qemu-system-x86_64 sgdisk veritysetup mkfs.erofs cpio depmod modprobe \
        dpkg-deb apt-get apt-cache cargo timeout; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    [[ -x /bin/busybox ]] && file -L /bin/busybox | grep -q 'statically linked' ||
        missing+=("/bin/busybox (static; package busybox-static)")
    ((${#missing[@]} == 0)) || die "missing tools: ${missing[*]}"
}

build_init() {
    if [[ -n "${RACKLET_INIT_BIN:-}" ]]; then
        INIT_BIN="$RACKLET_INIT_BIN"
        return
    fi
    log "building static racklet-init"
    (cd "$REPO_DIR" && RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --release -p racklet-init --target "$TARGET" \
        --target-dir "$REPO_DIR/target/init" >&2)
    INIT_BIN="$REPO_DIR/target/init/$TARGET/release/racklet-init"
    file "$INIT_BIN" | grep -q 'static' || die "$INIT_BIN is not statically linked"
}

fetch_kernel() {
    local package="${KERNEL_PACKAGE:-}"
    if [[ -z "$package" ]]; then
        package="$(apt-cache depends linux-image-cloud-amd64 |
            awk '/Depends: linux-image-[0-9]/ { print $2; exit }')"
        [[ -n "$package" ]] || die "apt-cache cannot resolve linux-image-cloud-amd64"
    fi
    if ! compgen -G "$WORK/kernel/boot/vmlinuz-*" >/dev/null; then
        log "downloading $package"
        rm -rf "$WORK/kernel"
        (cd "$WORK" && apt-get download "$package" >&2)
        dpkg-deb -x "$WORK/${package}"_*.deb "$WORK/kernel"
    fi
    KVER="$(ls "$WORK/kernel/lib/modules")"
    VMLINUZ="$WORK/kernel/boot/vmlinuz-$KVER"
    depmod -b "$WORK/kernel" "$KVER"
}

# The modules' closure in load order, as initramfs paths (/lib/modules/...).
module_closure() {
    local module
    for module in "${WANTED_MODULES[@]}"; do
        modprobe -d "$WORK/kernel" -S "$KVER" --show-depends "$module"
    done | awk '$1 == "insmod" { print $2 }' | sed "s|^$WORK/kernel||" | awk '!seen[$0]++'
}

build_initramfs() {
    local dir="$WORK/initramfs" module
    rm -rf "$dir"
    mkdir -p "$dir/etc/racklet-init"
    install -m 0755 "$INIT_BIN" "$dir/init"
    module_closure >"$dir/etc/racklet-init/modules"
    while read -r module; do
        case "$module" in
        *.ko) ;;
        *) die "$module is compressed; this kernel was expected to ship plain .ko files" ;;
        esac
        install -D -m 0644 "$WORK/kernel$module" "$dir$module"
    done <"$dir/etc/racklet-init/modules"
    log "initramfs modules: $(xargs -n1 basename <"$dir/etc/racklet-init/modules" | tr '\n' ' ')"
    (cd "$dir" && find . -mindepth 1 | LC_ALL=C sort |
        cpio -o -H newc -R 0:0 --quiet) >"$WORK/initramfs.cpio"
}

build_root() {
    local tree="$WORK/rootfs" applet
    rm -rf "$tree"
    mkdir -p "$tree"/{bin,sbin,dev,proc,sys,tmp}
    install -m 0755 /bin/busybox "$tree/bin/busybox"
    for applet in sh cat echo poweroff; do ln -s busybox "$tree/bin/$applet"; done
    cat >"$tree/sbin/init" <<'EOF'
#!/bin/sh
# Test root init: read the canary file (every block goes through dm-verity),
# report, power off.
if cat /canary.txt >/dev/null; then echo RACKLET-CANARY-READ; fi
echo RACKLET-ROOT-OK
poweroff -f
EOF
    chmod 0755 "$tree/sbin/init"
    # 64 KiB of marker text: whole 4 KiB data blocks, never inlined in metadata.
    head -c 65536 < <(yes "$CANARY_MARKER") >"$tree/canary.txt"
    rm -f "$WORK/root.img" "$WORK/verity.img"
    mkfs.erofs --quiet -T0 --all-root -U 6f1d5a2e-7c43-4b8e-9a10-2f1e3d4c5b6a \
        "$WORK/root.img" "$tree"
    ROOT_HASH="$(veritysetup format "$WORK/root.img" "$WORK/verity.img" |
        awk '/^Root hash:/ { print $3 }')"
    [[ "$ROOT_HASH" =~ ^[0-9a-f]{64}$ ]] || die "veritysetup format gave no root hash"
    veritysetup verify "$WORK/root.img" "$WORK/verity.img" "$ROOT_HASH"
    log "root hash $ROOT_HASH"
}

# A GUID from 32 hex digits, in string order (DPS: bytes of the root hash).
guid_of() { printf '%s-%s-%s-%s-%s' "${1:0:8}" "${1:8:4}" "${1:12:4}" "${1:16:4}" "${1:20:12}"; }

# Sectors needed for a file, rounded up to the partition alignment.
aligned_sectors() {
    local bytes sectors
    bytes="$(stat -c %s "$1")"
    sectors=$(((bytes + SECTOR - 1) / SECTOR))
    echo $(((sectors + PARTITION_ALIGN_SECTORS - 1) / PARTITION_ALIGN_SECTORS * PARTITION_ALIGN_SECTORS))
}

# disk.img: 1 = an (unformatted) ESP, 2 = root-a, 3 = verity-a, PARTUUIDs per DPS.
build_disk() {
    local disk="$WORK/disk.img" esp_start=$PARTITION_ALIGN_SECTORS
    local esp_sectors=$PARTITION_ALIGN_SECTORS root_sectors verity_sectors
    root_sectors="$(aligned_sectors "$WORK/root.img")"
    verity_sectors="$(aligned_sectors "$WORK/verity.img")"
    ROOT_START=$((esp_start + esp_sectors))
    VERITY_START=$((ROOT_START + root_sectors))
    local total=$((VERITY_START + verity_sectors + PARTITION_ALIGN_SECTORS))
    rm -f "$disk"
    truncate -s $((total * SECTOR)) "$disk"
    sgdisk \
        -n 1:$esp_start:+$esp_sectors -t 1:$ESP_TYPE -c 1:esp \
        -n 2:$ROOT_START:+$root_sectors -t 2:$ROOT_TYPE -c 2:root-a \
        -u 2:"$(guid_of "${ROOT_HASH:0:32}")" \
        -n 3:$VERITY_START:+$verity_sectors -t 3:$VERITY_TYPE -c 3:verity-a \
        -u 3:"$(guid_of "${ROOT_HASH:32:32}")" \
        "$disk" >/dev/null
    dd if="$WORK/root.img" of="$disk" bs=$SECTOR seek=$ROOT_START conv=notrunc status=none
    dd if="$WORK/verity.img" of="$disk" bs=$SECTOR seek=$VERITY_START conv=notrunc status=none
    sgdisk -p "$disk" | tail -4 >&2

    # The corrupt copy: first canary byte overwritten on disk, hash tree untouched.
    local offset
    offset="$(grep -obUa -m1 "$CANARY_MARKER" "$WORK/root.img" | cut -d: -f1)"
    [[ -n "$offset" ]] || die "canary not found in root.img"
    cp "$disk" "$WORK/disk-corrupt.img"
    printf 'X' | dd of="$WORK/disk-corrupt.img" bs=1 seek=$((ROOT_START * SECTOR + offset)) \
        conv=notrunc status=none
    log "corrupt copy: byte $offset of root-a (data block $((offset / 4096))) overwritten"
}

# boot <case> <disk image> <root hash>: runs QEMU, leaves the log in boot-<case>.log.
boot() {
    local name="$1" disk="$2" hash="$3" rc=0
    local console="$WORK/boot-$name.log"
    log "booting case '$name' (log: $console)"
    local started=$SECONDS
    timeout "$QEMU_TIMEOUT" qemu-system-x86_64 -accel tcg -m 1024 -nographic -no-reboot \
        -kernel "$VMLINUZ" -initrd "$WORK/initramfs.cpio" \
        -append "console=ttyS0 racklet.slot=a racklet.roothash=$hash panic=5" \
        -drive "file=$disk,format=raw,if=virtio" </dev/null >"$console" 2>&1 || rc=$?
    tr -d '\r' <"$console" >"$console.tmp" && mv "$console.tmp" "$console"
    ((rc != 124)) || die "case '$name': QEMU still running after ${QEMU_TIMEOUT}s (see $console)"
    log "case '$name': QEMU exited ($rc) after $((SECONDS - started))s"
}

check_good() {
    local console="$WORK/boot-good.log"
    grep -q '^RACKLET-CANARY-READ' "$console" || die "good: canary not read (see $console)"
    grep -q '^RACKLET-ROOT-OK' "$console" || die "good: no RACKLET-ROOT-OK (see $console)"
    ! grep -q 'racklet-init: FATAL' "$console" || die "good: unexpected FATAL (see $console)"
    grep 'racklet-init:\|RACKLET-' "$console" >&2
    log "PASS (a) good root reached its init"
}

check_wrong_hash() {
    local console="$WORK/boot-wrong-hash.log" fatal_lines
    fatal_lines="$(grep -c 'racklet-init: FATAL:' "$console" || true)"
    ((fatal_lines == 1)) || die "wrong-hash: expected 1 FATAL line, saw $fatal_lines (see $console)"
    grep 'racklet-init: FATAL:' "$console" | grep -q 'rebooting$' ||
        die "wrong-hash: FATAL line does not end in 'rebooting'"
    ! grep -q 'RACKLET-ROOT-OK' "$console" || die "wrong-hash: root booted anyway"
    grep 'racklet-init: FATAL:' "$console" >&2
    log "PASS (b) wrong roothash: one FATAL line, then reboot"
}

check_corrupt() {
    local console="$WORK/boot-corrupt.log"
    grep -qi 'verity.*corrupt' "$console" || die "corrupt: no dm-verity corruption logged (see $console)"
    ! grep -q 'RACKLET-ROOT-OK' "$console" || die "corrupt: root init finished despite corruption"
    grep -i 'verity\|restart\|RACKLET-' "$console" >&2
    log "PASS (c) corrupt data block: dm-verity detected it and restarted"
}

main() {
    local cases=("$@")
    ((${#cases[@]})) || cases=(good wrong-hash corrupt)
    need_tools
    mkdir -p "$WORK"
    build_init
    fetch_kernel
    build_initramfs
    build_root
    build_disk
    local case
    for case in "${cases[@]}"; do
        case "$case" in
        good) boot good "$WORK/disk.img" "$ROOT_HASH" && check_good ;;
        wrong-hash)
            # Change the first digit: the root PARTUUID no longer matches.
            local wrong
            wrong="$([[ ${ROOT_HASH:0:1} == 0 ]] && echo 1 || echo 0)${ROOT_HASH:1}"
            boot wrong-hash "$WORK/disk.img" "$wrong" && check_wrong_hash
            ;;
        corrupt) boot corrupt "$WORK/disk-corrupt.img" "$ROOT_HASH" && check_corrupt ;;
        *) die "unknown case '$case' (expected good, wrong-hash or corrupt)" ;;
        esac
    done
    log "all requested cases passed"
}

main "$@"
