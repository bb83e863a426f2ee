#!/usr/bin/env bash
# boot-smoke.sh — boot racklet-init under QEMU (TCG) against a hand-made
# dm-verity disk (ESP, root-a, verity-a, and an ext4 partition named `data`) and
# check the outcomes that matter:
#
#   good       good root  -> the root's /sbin/init prints RACKLET-ROOT-OK and powers off;
#                            /var is the ext4 data partition, /etc an overlay on it;
#   wrong-hash wrong racklet.roothash= -> exactly one "racklet-init: FATAL:" line, then
#                            a reboot (QEMU runs with -no-reboot, so it exits);
#   corrupt    a flipped byte in a file's data on the root -> the kernel logs dm-verity
#                            corruption when the file is read and restarts
#                            (restart_on_corruption), so RACKLET-ROOT-OK never shows;
#   persist    two boots of one disk: the first writes /etc/racklet-test and
#                            /var/racklet-test, the second finds both;
#   wiped      the data partition zeroed -> one "has no ext4 file system" line, the
#                            boot goes on, /var is not ext4, /etc stays read-only;
#   no-data    no partition named data -> one "no partition named data" line, the boot
#                            goes on;
#   etc-broken the data partition holds a file where the overlay's upper directory
#                            goes -> one FATAL line about the /etc overlay, reboot.
#
# A developer tool, not part of `cargo test`: it needs root-free but host-heavy tools
# and ~2 minutes. The project's real VM tests will replace it.
#
# Needs (Debian bookworm package names): qemu-system-x86 (bookworm-backports, see
# /work/shared/field-notes.md), gdisk (sgdisk), cryptsetup-bin (veritysetup),
# erofs-utils, e2fsprogs (mkfs.ext4), cpio, kmod (depmod, modprobe), busybox-static,
# and apt access to download Debian's cloud kernel. Always uses `-accel tcg` (KVM
# hangs on these hosts).
#
# Everything it downloads or writes goes to $RACKLET_INIT_TEST_DIR
# (default /tmp/racklet-init-test); nothing is written into the repository except the
# cargo build in $RACKLET_INIT_TARGET_DIR.
#
# Usage: racklet-init/tests/boot-smoke.sh [good|wrong-hash|corrupt|persist|wiped|no-data|etc-broken ...]
#        (default: all). Logs: $RACKLET_INIT_TEST_DIR/boot-<case>.log
#
# Environment:
#   RACKLET_INIT_TEST_DIR  work directory (default /tmp/racklet-init-test)
#   RACKLET_INIT_BIN       a prebuilt static racklet-init (default: build it)
#   RACKLET_INIT_TARGET_DIR cargo target directory for that build (default target/init)
#   KERNEL_PACKAGE         kernel package to download (default: what
#                          linux-image-cloud-amd64 depends on)
#   QEMU_TIMEOUT           seconds per boot before giving up (default 300)

set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WORK="${RACKLET_INIT_TEST_DIR:-/tmp/racklet-init-test}"
QEMU_TIMEOUT="${QEMU_TIMEOUT:-300}"
TARGET=x86_64-unknown-linux-gnu
# Modules the initramfs needs (their dependency closure is added by modprobe; built-in
# ones, like ext4 and its jbd2/mbcache/crc16/crc32c in the cloud kernel, are skipped).
WANTED_MODULES=(virtio_pci virtio_blk dm-verity erofs ext4 overlay)
# DPS partition type GUIDs (x86-64 root and root verity) and a plain ESP type.
ROOT_TYPE=4f68bce3-e8cd-4db1-96e7-fbcaf984b709
VERITY_TYPE=2c7357ed-ebd2-46d9-aec1-23d437ec2bf5
ESP_TYPE=c12a7328-f81f-11d2-ba4b-00a0c93ec93b
# The data partition (/var): DPS "var" type, found by racklet-init by its name `data`.
VAR_TYPE=4d21b016-b534-45c2-a9fb-5c16e091fd2d
DATA_SECTORS=$((32 * 2048))
# Text that fills the canary file; corruption case (c) flips its first byte on disk.
CANARY_MARKER=CANARYDATA
SECTOR=512
PARTITION_ALIGN_SECTORS=2048

log() { printf 'boot-smoke: %s\n' "$*" >&2; }
die() { printf 'boot-smoke: ERROR: %s\n' "$*" >&2; exit 1; }

need_tools() {
    local tool missing=()
    for tool in qemu-system-x86_64 sgdisk veritysetup mkfs.erofs mkfs.ext4 cpio depmod modprobe \
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
    local target_dir="${RACKLET_INIT_TARGET_DIR:-$REPO_DIR/target/init}"
    log "building static racklet-init"
    (cd "$REPO_DIR" && RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --release -p racklet-init --target "$TARGET" \
        --target-dir "$target_dir" >&2)
    INIT_BIN="$target_dir/$TARGET/release/racklet-init"
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
    mkdir -p "$tree"/{bin,sbin,dev,proc,sys,tmp,etc,var}
    install -m 0755 /bin/busybox "$tree/bin/busybox"
    for applet in sh cat echo grep sync poweroff; do ln -s busybox "$tree/bin/$applet"; done
    echo "from the read-only root" >"$tree/etc/racklet-lower"
    cat >"$tree/sbin/init" <<'EOF'
#!/bin/sh
# Test root init: read the canary file (every block goes through dm-verity),
# report what /etc and /var are, write a file to each on the first boot (or
# report it on a later one), power off.
export PATH=/bin
if cat /canary.txt >/dev/null; then echo RACKLET-CANARY-READ; fi
grep -q " /etc overlay " /proc/mounts && echo RACKLET-ETC-OVERLAY
grep -q " /var ext4 " /proc/mounts && echo RACKLET-VAR-EXT4
grep -E " /(etc|var) " /proc/mounts | while read -r line; do echo "RACKLET-MOUNT $line"; done
[ -f /etc/racklet-lower ] && echo RACKLET-ETC-LOWER-VISIBLE
[ -f /var/racklet-initial ] && echo RACKLET-VAR-INITIAL
for dir in /etc /var; do
    if [ -f $dir/racklet-test ]; then
        echo "RACKLET-FOUND $dir/racklet-test: $(cat $dir/racklet-test)"
    elif echo "written on an earlier boot" >$dir/racklet-test 2>/dev/null; then
        echo "RACKLET-WROTE $dir/racklet-test"
    else
        echo "RACKLET-READONLY $dir"
    fi
done
[ -f /var/lib/racklet/etc/upper/racklet-test ] && echo RACKLET-UPPER-HAS-FILE
sync
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

# data.img: the data partition as the image builder ships it, ext4 holding the initial
# /var; data-broken.img: the same with a file where the /etc overlay's upper dir goes.
build_data() {
    local tree="$WORK/vartree"
    rm -rf "$tree" "$WORK/data.img" "$WORK/data-broken.img"
    mkdir -p "$tree"
    echo "initial /var content" >"$tree/racklet-initial"
    mkfs.ext4 -q -F -L data -U 3f0c7a9e-0d51-4b6f-8c2e-5a7d9b1e4c60 -E root_owner=0:0 \
        -d "$tree" "$WORK/data.img" $((DATA_SECTORS / 2))k
    mkdir -p "$tree/lib/racklet/etc"
    echo "not a directory" >"$tree/lib/racklet/etc/upper"
    mkfs.ext4 -q -F -L data -U 3f0c7a9e-0d51-4b6f-8c2e-5a7d9b1e4c61 -E root_owner=0:0 \
        -d "$tree" "$WORK/data-broken.img" $((DATA_SECTORS / 2))k
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

# disk.img: 1 = an (unformatted) ESP, 2 = root-a, 3 = verity-a (PARTUUIDs per DPS),
# 4 = data (ext4).
build_disk() {
    local disk="$WORK/disk.img" esp_start=$PARTITION_ALIGN_SECTORS
    local esp_sectors=$PARTITION_ALIGN_SECTORS root_sectors verity_sectors
    root_sectors="$(aligned_sectors "$WORK/root.img")"
    verity_sectors="$(aligned_sectors "$WORK/verity.img")"
    ROOT_START=$((esp_start + esp_sectors))
    VERITY_START=$((ROOT_START + root_sectors))
    DATA_START=$((VERITY_START + verity_sectors))
    local total=$((DATA_START + DATA_SECTORS + PARTITION_ALIGN_SECTORS))
    rm -f "$disk"
    truncate -s $((total * SECTOR)) "$disk"
    sgdisk \
        -n 1:$esp_start:+$esp_sectors -t 1:$ESP_TYPE -c 1:esp \
        -n 2:$ROOT_START:+$root_sectors -t 2:$ROOT_TYPE -c 2:root-a \
        -u 2:"$(guid_of "${ROOT_HASH:0:32}")" \
        -n 3:$VERITY_START:+$verity_sectors -t 3:$VERITY_TYPE -c 3:verity-a \
        -u 3:"$(guid_of "${ROOT_HASH:32:32}")" \
        -n 4:$DATA_START:+$DATA_SECTORS -t 4:$VAR_TYPE -c 4:data \
        "$disk" >/dev/null
    dd if="$WORK/root.img" of="$disk" bs=$SECTOR seek=$ROOT_START conv=notrunc status=none
    dd if="$WORK/verity.img" of="$disk" bs=$SECTOR seek=$VERITY_START conv=notrunc status=none
    dd if="$WORK/data.img" of="$disk" bs=$SECTOR seek=$DATA_START conv=notrunc status=none
    sgdisk -p "$disk" | tail -5 >&2

    # The corrupt copy: first canary byte overwritten on disk, hash tree untouched.
    local offset
    offset="$(grep -obUa -m1 "$CANARY_MARKER" "$WORK/root.img" | cut -d: -f1)"
    [[ -n "$offset" ]] || die "canary not found in root.img"
    cp "$disk" "$WORK/disk-corrupt.img"
    printf 'X' | dd of="$WORK/disk-corrupt.img" bs=1 seek=$((ROOT_START * SECTOR + offset)) \
        conv=notrunc status=none
    log "corrupt copy: byte $offset of root-a (data block $((offset / 4096))) overwritten"
}

# A fresh copy of disk.img for one case (boots write to the data partition).
fresh_disk() {
    local copy="$WORK/disk-$1.img"
    cp --sparse=always "$WORK/disk.img" "$copy"
    echo "$copy"
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

# expect <case> <pattern>...: every pattern (grep -E) is in the case's log.
expect() {
    local name="$1" pattern console="$WORK/boot-$1.log"
    shift
    for pattern in "$@"; do
        grep -qE -- "$pattern" "$console" || die "$name: no '$pattern' (see $console)"
    done
}

# refute <case> <pattern>...: no pattern (grep -E) is in the case's log.
refute() {
    local name="$1" pattern console="$WORK/boot-$1.log"
    shift
    for pattern in "$@"; do
        ! grep -qE -- "$pattern" "$console" || die "$name: unexpected '$pattern' (see $console)"
    done
}

show() { grep 'racklet-init:\|RACKLET-' "$WORK/boot-$1.log" >&2; }

check_good() {
    local console="$WORK/boot-good.log"
    grep -q '^RACKLET-CANARY-READ' "$console" || die "good: canary not read (see $console)"
    grep -q '^RACKLET-ROOT-OK' "$console" || die "good: no RACKLET-ROOT-OK (see $console)"
    ! grep -q 'racklet-init: FATAL' "$console" || die "good: unexpected FATAL (see $console)"
    expect good '^RACKLET-ETC-OVERLAY' '^RACKLET-VAR-EXT4' '^RACKLET-ETC-LOWER-VISIBLE' \
        '^RACKLET-VAR-INITIAL' '^RACKLET-WROTE /etc/racklet-test' \
        '^RACKLET-WROTE /var/racklet-test' '^RACKLET-UPPER-HAS-FILE' \
        'racklet-init: slot a: .*; data vda4 \(ext4\) on /sysroot/var, /etc overlay; starting /sbin/init'
    show good
    log "PASS (a) good root reached its init, /var on ext4 data, /etc overlay"
}

check_persist() {
    local first=persist-1 second=persist-2
    expect $first '^RACKLET-ROOT-OK' '^RACKLET-ETC-OVERLAY' '^RACKLET-VAR-EXT4' \
        '^RACKLET-WROTE /etc/racklet-test' '^RACKLET-WROTE /var/racklet-test'
    refute $first 'racklet-init: FATAL'
    expect $second '^RACKLET-ROOT-OK' '^RACKLET-ETC-OVERLAY' '^RACKLET-VAR-EXT4' \
        '^RACKLET-FOUND /etc/racklet-test: written on an earlier boot' \
        '^RACKLET-FOUND /var/racklet-test: written on an earlier boot' '^RACKLET-ETC-LOWER-VISIBLE'
    refute $second 'racklet-init: FATAL' 'RACKLET-WROTE'
    show $second
    log "PASS (d) /etc and /var kept their files across a reboot"
}

check_wiped() {
    expect wiped '^RACKLET-ROOT-OK' '^RACKLET-READONLY /etc' '^RACKLET-ETC-LOWER-VISIBLE' \
        'racklet-init: data partition vda4 has no ext4 file system; /var will be created on this boot by systemd \(x-systemd.makefs\), /etc stays read-only until the next boot' \
        'racklet-init: slot a: .*; /var not mounted; starting /sbin/init'
    refute wiped 'racklet-init: FATAL' '^RACKLET-VAR-EXT4' '^RACKLET-ETC-OVERLAY'
    show wiped
    log "PASS (e) wiped data partition: one line, boot goes on, /var not ext4, /etc read-only"
}

check_no_data() {
    expect no-data '^RACKLET-ROOT-OK' '^RACKLET-READONLY /etc' \
        'racklet-init: no partition named data on vda \(the root.s disk\)'
    refute no-data 'racklet-init: FATAL' '^RACKLET-VAR-EXT4' '^RACKLET-ETC-OVERLAY' 'has no ext4'
    show no-data
    log "PASS (f) no data partition: one line, boot goes on"
}

check_etc_broken() {
    local console="$WORK/boot-etc-broken.log" fatal_lines
    fatal_lines="$(grep -c 'racklet-init: FATAL:' "$console" || true)"
    ((fatal_lines == 1)) || die "etc-broken: expected 1 FATAL line, saw $fatal_lines (see $console)"
    expect etc-broken 'racklet-init: FATAL: slot a: cannot set up the /etc overlay: create /sysroot/var/lib/racklet/etc/upper: .* — rebooting$'
    refute etc-broken 'RACKLET-ROOT-OK'
    show etc-broken
    log "PASS (g) /etc overlay impossible on a mounted /var: one FATAL line, reboot"
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
    ((${#cases[@]})) || cases=(good wrong-hash corrupt persist wiped no-data etc-broken)
    need_tools
    mkdir -p "$WORK"
    build_init
    fetch_kernel
    build_initramfs
    build_root
    build_data
    build_disk
    local case disk
    for case in "${cases[@]}"; do
        case "$case" in
        good) boot good "$(fresh_disk good)" "$ROOT_HASH" && check_good ;;
        wrong-hash)
            # Change the first digit: the root PARTUUID no longer matches.
            local wrong
            wrong="$([[ ${ROOT_HASH:0:1} == 0 ]] && echo 1 || echo 0)${ROOT_HASH:1}"
            boot wrong-hash "$(fresh_disk wrong-hash)" "$wrong" && check_wrong_hash
            ;;
        corrupt) boot corrupt "$WORK/disk-corrupt.img" "$ROOT_HASH" && check_corrupt ;;
        persist)
            disk="$(fresh_disk persist)"
            boot persist-1 "$disk" "$ROOT_HASH"
            boot persist-2 "$disk" "$ROOT_HASH"
            check_persist
            ;;
        wiped)
            disk="$(fresh_disk wiped)"
            dd if=/dev/zero of="$disk" bs=$SECTOR seek=$DATA_START count=$DATA_SECTORS \
                conv=notrunc status=none
            boot wiped "$disk" "$ROOT_HASH" && check_wiped
            ;;
        no-data)
            disk="$(fresh_disk no-data)"
            sgdisk -d 4 "$disk" >/dev/null
            boot no-data "$disk" "$ROOT_HASH" && check_no_data
            ;;
        etc-broken)
            disk="$(fresh_disk etc-broken)"
            dd if="$WORK/data-broken.img" of="$disk" bs=$SECTOR seek=$DATA_START \
                conv=notrunc status=none
            boot etc-broken "$disk" "$ROOT_HASH" && check_etc_broken
            ;;
        *) die "unknown case '$case' (expected good, wrong-hash, corrupt, persist, wiped, no-data or etc-broken)" ;;
        esac
    done
    log "all requested cases passed"
}

main "$@"
