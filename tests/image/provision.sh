#!/usr/bin/env bash
# `racklet-image provision` on a copy of a built disk image: the settings land
# on the ESP as racklet/settings.toml (read back with mtools' mtype), the FAT
# stays clean (fsck.fat -n), the GPT and every other partition are untouched;
# an inventory gives each node its hostname and an even wave seed; an invalid
# file is refused with the file and key named, before anything is written.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$here/lib.sh"

# check_provision BUILD_DIR
check_provision() {
  local build="$1" root scratch builder disk esp_offset esp_size output before after
  root="$(project_root)"
  builder="${RACKLET_IMAGE:-$root/target/release/racklet-image}"
  scratch="$(mktemp -d /tmp/racklet-provision.XXXXXX)"
  disk="$scratch/disk.img"
  cp --sparse=always "$build/disk.img" "$disk"
  read -r esp_offset esp_size < <(sfdisk --json "$disk" | python3 -c '
import json, sys
table = json.load(sys.stdin)["partitiontable"]
esp = next(p for p in table["partitions"] if p.get("name") == "esp")
print(esp["start"] * 512, esp["size"] * 512)')
  # Everything but the ESP, before and after.
  outside_esp() {
    python3 "$root/tests/sparse_sha256.py" "$disk" --skip "$esp_offset:$esp_size"
  }
  before="$(outside_esp)"

  # A throwaway key.
  ssh-keygen -q -t ed25519 -N '' -C someone@laptop -f "$scratch/id_ed25519"
  cat > "$scratch/settings.toml" <<EOF
hostname = "pi-1"
[ssh]
authorized_keys = ["$(cat "$scratch/id_ed25519.pub")"]
[kubernetes]
role = "server"
cluster_init = true
[update]
maintenance_window = "02:00-04:00"
EOF
  if output=$("$builder" --json provision --disk "$disk" --settings "$scratch/settings.toml" 2>&1); then
    pass "provision: settings written ($(echo "$output" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["file"], d["bytes"], "bytes at", d["esp_offset"])'))"
  else
    fail "provision: settings written" "$output"
  fi
  check "provision: mtype reads back hostname, key and role" bash -c "
    mtype -i '$disk@@$esp_offset' ::racklet/settings.toml > '$scratch/read'
    grep -qx 'hostname = \"pi-1\"' '$scratch/read' && grep -qF '$(cut -d' ' -f2 "$scratch/id_ed25519.pub")' '$scratch/read' &&
    grep -qx 'role = \"server\"' '$scratch/read' && grep -qx 'cluster_init = true' '$scratch/read'"
  check "provision: the ESP is a clean FAT (fsck.fat -n)" bash -c "
    dd if='$disk' of='$scratch/esp.img' bs=1M skip=$((esp_offset / 1048576)) count=$((esp_size / 1048576)) status=none &&
    fsck.fat -n '$scratch/esp.img'"
  after="$(outside_esp)"
  if [ "$before" = "$after" ]; then
    pass "provision: the GPT and the other partitions are unchanged"
  else
    fail "provision: the GPT and the other partitions are unchanged" "sha256 $before before, $after after"
  fi
  check "provision: sgdisk -v finds the GPT valid" bash -c "sgdisk -v '$disk' | grep -q 'No problems found'"

  # A rack inventory: the node's table over [common], hostname and seed derived.
  cat > "$scratch/rack.toml" <<'EOF'
[common.kubernetes]
role = "agent"
server = "https://pi-1.local:6443"
token_file = "racklet/k3s-token"
[nodes.pi-1.kubernetes]
role = "server"
cluster_init = true
server = ""
[nodes.pi-2]
[nodes.pi-3]
[nodes.pi-4]
EOF
  # (pi-1 cannot drop `server` by an empty value: refused, naming the node's table.)
  if output=$("$builder" provision --disk "$disk" --inventory "$scratch/rack.toml" --node pi-1 2>&1); then
    fail "provision --inventory: an invalid node table is refused" "accepted: $output"
  elif echo "$output" | grep -q "nodes.pi-1" && echo "$output" | grep -q "kubernetes.server"; then
    pass "provision --inventory: an invalid node table is refused ($(echo "$output" | head -n1 | cut -c1-160))"
  else
    fail "provision --inventory: an invalid node table is refused" "the message names neither the node nor the key: $output"
  fi
  if output=$("$builder" --json provision --disk "$disk" --inventory "$scratch/rack.toml" --node pi-3 2>&1) &&
     echo "$output" | python3 -c '
import json, sys
d = json.load(sys.stdin)
assert d["hostname"] == "pi-3" and d["kubernetes_role"] == "agent" and d["wave_seed"] == 1280, d'; then
    pass "provision --inventory: pi-3 is an agent named pi-3 with wave seed 1280 (the third of four)"
  else
    fail "provision --inventory: pi-3 is an agent named pi-3 with wave seed 1280 (the third of four)" "$output"
  fi

  # Bad input: refused, nothing written.
  before="$(mtype -i "$disk@@$esp_offset" ::racklet/settings.toml | sha256sum)"
  printf 'hostname = "Pi_1"\n[kubernetes]\nrole = "agent"\n' > "$scratch/bad.toml"
  if output=$("$builder" provision --disk "$disk" --settings "$scratch/bad.toml" 2>&1); then
    fail "provision: an invalid settings file is refused" "accepted: $output"
  elif echo "$output" | grep -q "$scratch/bad.toml: hostname: " && echo "$output" | grep -q "kubernetes.server: an agent needs"; then
    pass "provision: an invalid settings file is refused ($(echo "$output" | head -n1 | cut -c1-120)...)"
  else
    fail "provision: an invalid settings file is refused" "the message does not name the file and keys: $output"
  fi
  after="$(mtype -i "$disk@@$esp_offset" ::racklet/settings.toml | sha256sum)"
  if [ "$before" = "$after" ]; then
    pass "provision: after a refusal the ESP holds the previous settings"
  else
    fail "provision: after a refusal the ESP holds the previous settings" "racklet/settings.toml changed"
  fi
  head -c 1048576 /dev/zero > "$scratch/not-a-disk.img"
  if output=$("$builder" provision --disk "$scratch/not-a-disk.img" --settings "$scratch/settings.toml" 2>&1); then
    fail "provision: a file without a GPT is refused" "accepted: $output"
  else
    pass "provision: a file without a GPT is refused ($(echo "$output" | head -n1 | cut -c1-120))"
  fi
  rm -rf "$scratch"
}
