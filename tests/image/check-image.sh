#!/usr/bin/env bash
# Check a built image directory (build/<variant>) with real tools:
# sgdisk -v, sfdisk --json, fsck.fat -n, veritysetup verify, fsck.erofs,
# the manifest's hashes recomputed, UKI command lines, and that a flipped byte
# in the root makes both our verifier and veritysetup fail.
# Usage: check-image.sh BUILD_DIR   (sourced by run.sh, or run alone)
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$here/lib.sh"
root="$(project_root)"
builder="${RACKLET_IMAGE:-$root/target/release/racklet-image}"

# section_of UKI SECTION OUT: dump one PE section (the host objcopy cannot read arm64 PE).
section_of() {
  objcopy -O binary --only-section="$2" "$1" "$3" 2>/dev/null ||
    aarch64-linux-gnu-objcopy -O binary --only-section="$2" "$1" "$3"
}

check_image() {
  local dir="$1" variant
  variant="$(basename "$dir")"
  local disk="$dir/disk.img" manifest="$dir/manifest.json"
  local scratch; scratch="$(mktemp -d)"
  local root_hash; root_hash="$(json "$manifest" 'd["verity"]["root_hash"]')"

  check "$variant: sgdisk -v finds no problems" bash -c "sgdisk -v '$disk' | grep -q 'No problems found'"
  check "$variant: GPT has the DPS layout and UUIDs from the root hash" python3 - "$disk" "$root_hash" "$(json "$manifest" 'd["arch"]')" <<'PY'
import json, subprocess, sys, uuid
disk, root_hash, arch = sys.argv[1:]
table = json.loads(subprocess.check_output(["sfdisk", "--json", disk]))["partitiontable"]
parts = {p["name"]: p for p in table["partitions"]}
assert list(parts) == ["esp", "root-a", "verity-a", "root-b", "verity-b", "data"], list(parts)
root_type = {"x86_64": "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709", "aarch64": "B921B045-1DF0-41C3-AF44-4C6F280D3FAE"}[arch]
verity_type = {"x86_64": "2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5", "aarch64": "DF3300CE-D69F-4C92-978C-9BFB0F38D820"}[arch]
assert parts["esp"]["type"] == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
for name in ["root-a", "root-b"]: assert parts[name]["type"] == root_type, parts[name]
for name in ["verity-a", "verity-b"]: assert parts[name]["type"] == verity_type, parts[name]
assert parts["data"]["type"] == "4D21B016-B534-45C2-A9FB-5C16E091FD2D"
assert parts["root-a"]["uuid"] == str(uuid.UUID(root_hash[:32])).upper(), (parts["root-a"]["uuid"], root_hash)
assert parts["verity-a"]["uuid"] == str(uuid.UUID(root_hash[32:])).upper()
assert parts["root-a"]["size"] == parts["root-b"]["size"] and parts["verity-a"]["size"] == parts["verity-b"]["size"]
for p in table["partitions"]: assert p["start"] % 2048 == 0, p
PY
  extract_partition "$disk" esp "$scratch/esp.img"
  extract_partition "$disk" root-a "$scratch/root-a.img"
  extract_partition "$disk" verity-a "$scratch/verity-a.img"
  extract_partition "$disk" root-b "$scratch/root-b.img"
  extract_partition "$disk" data "$scratch/data.img"
  check "$variant: fsck.fat -n accepts the ESP" fsck.fat -n "$scratch/esp.img"
  check "$variant: veritysetup verify accepts slot A" veritysetup verify "$scratch/root-a.img" "$scratch/verity-a.img" "$root_hash"
  local erofs_size; erofs_size="$(json "$manifest" '[a for a in d["artifacts"] if a["kind"]=="root-filesystem"][0]["uncompressed_size"]')"
  head -c "$erofs_size" "$scratch/root-a.img" > "$scratch/root.erofs"
  check "$variant: fsck.erofs accepts root-a" fsck.erofs "$scratch/root.erofs"
  check "$variant: e2fsck accepts the data partition" e2fsck -fn "$scratch/data.img"
  check "$variant: slot B is empty" bash -c "! tr -d '\\000' < '$scratch/root-b.img' | head -c 1 | grep -q ."
  check "$variant: racklet-image verify (our GPT + dm-verity + manifest hashes)" "$builder" verify "$dir"
  check "$variant: manifest hashes recomputed with Python's hashlib" python3 - "$dir" "$(project_root)/tests" <<'PY'
import hashlib, json, subprocess, sys, os
d = sys.argv[1]
sys.path.insert(0, sys.argv[2])
from sparse_sha256 import sparse_sha256 as sha  # holes hashed as zeros, not read
m = json.load(open(os.path.join(d, "manifest.json")))
for o in m["outputs"]:
    p = os.path.join(d, o["name"]); assert sha(p) == o["sha256"] and os.path.getsize(p) == o["size"], p
for a in m["artifacts"]:
    p = os.path.join(d, "update", a["name"]); assert sha(p) == a["sha256"] and os.path.getsize(p) == a["size"], p
    raw = subprocess.check_output(["zstd", "-dc", p]) if a["compression"] == "zstd" else open(p, "rb").read()
    assert hashlib.sha256(raw).hexdigest() == a["uncompressed_sha256"] and len(raw) == a["uncompressed_size"], p
assert m["packages"] and all(len(p["sha256"]) == 64 for p in m["packages"])
assert any(p["name"].startswith("linux-image-") for p in m["packages"])
assert any(p["name"] == "systemd" for p in m["packages"]) and any(p["name"] == "containerd" for p in m["packages"])
PY
  for slot in a b; do
    section_of "$dir/update/uki-$slot.efi" .cmdline "$scratch/cmdline-$slot"
    check "$variant: UKI $slot's command line names slot $slot and the root hash" \
      grep -q "racklet.slot=$slot racklet.roothash=$root_hash" "$scratch/cmdline-$slot"
  done
  section_of "$dir/update/uki-a.efi" .osrel "$scratch/osrel"
  check "$variant: os-release in the UKI carries IMAGE_ID, IMAGE_VERSION, VARIANT_ID" bash -c "
    grep -qx 'IMAGE_ID=racklet-os' '$scratch/osrel' &&
    grep -qx 'IMAGE_VERSION=$(json "$manifest" 'd["version"]')' '$scratch/osrel' &&
    grep -qx 'VARIANT_ID=$variant' '$scratch/osrel'"
  check "$variant: the ESP holds slot A's UKI, identical to update/uki-a.efi" bash -c "
    mcopy -n -i '$scratch/esp.img' ::/EFI/Linux/racklet-a.efi '$scratch/esp-uki-a.efi' && cmp '$scratch/esp-uki-a.efi' '$dir/update/uki-a.efi'"

  # A flipped byte inside the root: both verifiers must refuse it.
  cp --sparse=always "$scratch/root-a.img" "$scratch/root-a-flipped.img"
  local offset=$((erofs_size / 2))
  printf '\xff' | dd of="$scratch/root-a-flipped.img" bs=1 seek="$offset" conv=notrunc status=none
  if cmp -s "$scratch/root-a.img" "$scratch/root-a-flipped.img"; then
    printf '\x00' | dd of="$scratch/root-a-flipped.img" bs=1 seek="$offset" conv=notrunc status=none
  fi
  check "$variant: veritysetup verify refuses a flipped byte in root-a" bash -c "! veritysetup verify '$scratch/root-a-flipped.img' '$scratch/verity-a.img' '$root_hash'"
  cp -r --sparse=always "$dir" "$scratch/flipped-build"
  local start size
  read -r start size < <(partition_extent "$disk" root-a)
  dd if="$scratch/root-a-flipped.img" of="$scratch/flipped-build/disk.img" bs=1M seek="$start" oflag=seek_bytes conv=notrunc,sparse status=none
  # Refresh the recorded disk hash so only the verity check can fail.
  python3 - "$scratch/flipped-build" "$(project_root)/tests" <<'PY'
import json, os, sys
d = sys.argv[1]; p = os.path.join(d, "manifest.json"); m = json.load(open(p))
sys.path.insert(0, sys.argv[2])
from sparse_sha256 import sparse_sha256
h = sparse_sha256(os.path.join(d, "disk.img"))
m["outputs"][0]["sha256"] = h
open(p, "w").write(json.dumps(m, indent=2) + "\n")
PY
  check "$variant: racklet-image verify refuses a flipped byte in root-a" bash -c "
    ! '$builder' verify '$scratch/flipped-build' 2> '$scratch/verify.err' && grep -q 'dm-verity' '$scratch/verify.err'"
  rm -rf "$scratch"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  [ $# -eq 1 ] || { echo "usage: $0 BUILD_DIR" >&2; exit 2; }
  check_image "$1"
  summary
fi
