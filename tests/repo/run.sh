#!/usr/bin/env bash
# A second TUF client against the repository `racklet-image publish` writes,
# with the root keys offline: `keys generate` makes the keys in an "offline"
# directory (root threshold 2 of 3), `keys export` copies the signed root and
# the targets, snapshot and timestamp keys (no root key) to the publishing
# directory, and every publish and refresh runs with that directory alone.
# The repository is served with `python3 -m http.server` on 127.0.0.1 and
# python-tuf's ngclient downloads every target, checking each file's sha256
# against the build's manifest.json. Then a compromised targets key is
# rotated on the offline side (root 2, exported to the publishing directory),
# the second version is published with the new targets key, and a client
# bootstrapped with 1.root.json follows 1 -> 2; targets metadata signed with
# the old key is refused (and the same forgery with the new key accepted, so
# the refusal is the key's). Last, root keys are rotated with one of three
# root keys lost (root 3), a routine refresh that would need a new root is
# refused, and a corrupted target is refused.
#
# Usage: tests/repo/run.sh [BUILD_DIR_V1 BUILD_DIR_V2]
#   With no arguments two synthetic builds (random artifacts, a few KB) are
#   made; with two real build directories (build/<variant>, the second of a
#   higher version) those are published instead.
# Environment: RACKLET_IMAGE=path/to/racklet-image to skip the cargo build.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

failures=0
checks=0
pass() { checks=$((checks + 1)); echo "ok   $*"; }
fail() { checks=$((checks + 1)); failures=$((failures + 1)); echo "FAIL $*"; }
die() {
  echo "FAIL: tests/repo: $*"
  exit 1
}

if [ $# -ne 0 ] && [ $# -ne 2 ]; then
  echo "usage: $0 [BUILD_DIR_V1 BUILD_DIR_V2]" >&2
  exit 2
fi

# --- the publisher -----------------------------------------------------------
if [ -n "${RACKLET_IMAGE:-}" ]; then
  builder="$RACKLET_IMAGE"
elif command -v cargo >/dev/null; then
  echo "building racklet-image (cargo build --release -p image-builder)"
  (cd "$root" && cargo build --release --quiet -p image-builder --bin racklet-image) ||
    die "cargo build failed"
  builder="$root/target/release/racklet-image"
else
  builder="$root/target/release/racklet-image"
fi
[ -x "$builder" ] || die "no racklet-image at $builder (set RACKLET_IMAGE or install cargo)"

# --- python-tuf ----------------------------------------------------------------
# Without pyca/cryptography python-tuf cannot verify ed25519 signatures and
# reports every role as "signed by 0/1 keys".
if ! python3 -c 'import tuf.ngclient, cryptography' 2>/dev/null; then
  echo "installing python-tuf and cryptography with pip"
  python3 -m pip install --quiet 'tuf>=5' cryptography ||
    die "pip install 'tuf>=5' cryptography failed"
fi
tuf_version="$(python3 -c 'import tuf; print(tuf.__version__)')" || die "python-tuf does not import"
echo "python-tuf $tuf_version, $("$builder" --version)"

# --- scratch space, cleaned up on exit ---------------------------------------
scratch="$(mktemp -d "${TMPDIR:-/tmp}/racklet-repo-test.XXXXXX")"
server_pids=()
cleanup() {
  local pid
  for pid in "${server_pids[@]}"; do
    kill "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  rm -rf "$scratch"
}
trap cleanup EXIT

export RACKLET_LOG=warn
offline="$scratch/offline-keys"  # the root keys: where generate and rotate-root run
keys="$scratch/keys"             # the publishing keys: never a root key
repo="$scratch/repo"

# racklet LOG_NAME ARGS...: run the publisher, keep its output in a log file.
racklet() {
  local name="$1"; shift
  if "$builder" "$@" >"$scratch/$name.log" 2>&1; then
    pass "racklet-image $*"
  else
    fail "racklet-image $* (exit $?):"
    sed 's/^/     /' "$scratch/$name.log"
    return 1
  fi
}

# key_files DIR ROLE: the private key files of ROLE in DIR/keys.
key_files() {
  find "$1/keys" -maxdepth 1 -name "$2-*.pk8.der" 2>/dev/null | sort
}

no_root_key_in_publishing_keys() {
  if [ -z "$(key_files "$keys" root)" ]; then
    pass "no root key in the publishing key directory ($1)"
  else
    fail "root key(s) in the publishing key directory ($1): $(key_files "$keys" root)"
  fi
}

# --- two builds ------------------------------------------------------------------
if [ $# -eq 2 ]; then
  build1="$(cd "$1" && pwd)" || die "no build directory $1"
  build2="$(cd "$2" && pwd)" || die "no build directory $2"
  for build in "$build1" "$build2"; do
    [ -f "$build/manifest.json" ] || die "$build has no manifest.json"
  done
else
  build1="$scratch/build-1.0.0"
  build2="$scratch/build-1.1.0"
  python3 "$here/make_build.py" "$build1" 1.0.0 || die "make_build.py failed"
  python3 "$here/make_build.py" "$build2" 1.1.0 || die "make_build.py failed"
fi

# --- keys made offline; publishing without the root key ------------------------------
racklet keys-generate keys generate --dir "$offline" --role-keys root=3/2 || die "cannot make keys"
racklet export-1 keys export --dir "$offline" --to "$keys" || die "cannot export the publishing keys"
no_root_key_in_publishing_keys "after keys export"
# The offline side keeps only the root keys from here on.
for role in targets snapshot timestamp; do
  key_files "$offline" "$role" | xargs -r rm -f
done
racklet publish-1 publish --build "$build1" --repo "$repo" --keys "$keys" || die "publish failed"
racklet validate-1 repo validate --repo "$repo"

# --- serve it on a free port of 127.0.0.1 ----------------------------------------
# serve DIR: start http.server for DIR in the background; sets $served_base.
serve() {
  local directory="$1" port log
  port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  log="$scratch/http-$port.log"
  python3 -m http.server --bind 127.0.0.1 --directory "$directory" "$port" >"$log" 2>&1 &
  server_pids+=("$!")
  served_base="http://127.0.0.1:$port"
  for _ in $(seq 1 50); do
    python3 -c "import urllib.request; urllib.request.urlopen('$served_base/metadata/1.root.json')" \
      2>/dev/null && return 0
    kill -0 "${server_pids[-1]}" 2>/dev/null || die "http.server exited: $(cat "$log")"
    sleep 0.1
  done
  die "http.server on port $port does not answer"
}
serve "$repo"
base="$served_base"

# client_run NAME ROOT EXPECTED_ROOT_VERSION BUILD...: python-tuf from ROOT
# against $client_base (default $base), every target; log in $scratch/NAME.log.
client_run() {
  local name="$1" bootstrap="$2" expected="$3" url="${client_base:-$base}"
  shift 3
  # The trust anchor is copied: the repository directory is swapped on every change.
  cp "$bootstrap" "$scratch/$name.root.json"
  python3 "$here/python_tuf_client.py" \
    --metadata-url "$url/metadata/" --targets-url "$url/targets/" \
    --root "$scratch/$name.root.json" --expect-root-version "$expected" \
    "$@" >"$scratch/$name.log" 2>&1
}

# client NAME ROOT EXPECTED_ROOT_VERSION BUILD...: client_run must pass.
client() {
  local name="$1"
  if client_run "$@"; then
    pass "python-tuf ($name): $(tail -n 1 "$scratch/$name.log")"
    grep -E '^(bootstrapped|targets.json)' "$scratch/$name.log" | sed 's/^/     /'
  else
    fail "python-tuf ($name):"
    sed 's/^/     /' "$scratch/$name.log"
  fi
}

cp "$repo/metadata/1.root.json" "$scratch/first.root.json"
client published-without-root-key "$scratch/first.root.json" 1 "$build1"

# --- a compromised targets key, rotated with the offline root ----------------------
old_targets_key="$(key_files "$keys" targets)"
racklet rotate-targets keys rotate-root --dir "$offline" --rotate-role targets
racklet export-2 keys export --dir "$offline" --to "$keys"
no_root_key_in_publishing_keys "after the targets key rotation"
retired_targets_key="$keys/retired/$(basename "$old_targets_key")"
new_targets_key="$(key_files "$keys" targets)"
if [ -f "$retired_targets_key" ] && [ -n "$new_targets_key" ] &&
  [ "$new_targets_key" != "$old_targets_key" ]; then
  pass "the old targets key is retired, $(basename "$new_targets_key") replaces it"
else
  fail "targets keys after the export: $new_targets_key, retired: $(ls "$keys/retired" 2>&1)"
fi
racklet publish-2 publish --build "$build2" --repo "$repo" --keys "$keys" \
  --wave 512@+0h --wave 2048@+1d || die "publish failed"
if [ -f "$repo/metadata/2.root.json" ]; then
  pass "metadata/2.root.json published"
else
  fail "metadata/2.root.json is missing after rotate-root + export + publish"
fi
if cmp -s "$repo/metadata/1.root.json" "$scratch/first.root.json"; then
  pass "metadata/1.root.json unchanged by the rotation"
else
  fail "metadata/1.root.json changed"
fi
# The second version comes with a delta from the first (deltas.json and its
# patches are TUF targets; the client below downloads and applies them).
if grep -q "^  delta from " "$scratch/publish-2.log" &&
  ! grep -q "delta from" "$scratch/publish-1.log"; then
  pass "publish reports the delta from the first version: $(grep -A3 '^  delta from ' "$scratch/publish-2.log" | tr -s ' ' | tr '\n' ';')"
else
  fail "publish did not report one delta from the first version:"
  sed 's/^/     /' "$scratch/publish-1.log" "$scratch/publish-2.log"
fi
client after-targets-rotation "$scratch/first.root.json" 2 "$build1" "$build2"
if grep -q "^deltas.json: 1 deltas, [1-9][0-9]* patches, [1-9]" "$scratch/after-targets-rotation.log"; then
  pass "python-tuf: $(grep '^deltas.json:' "$scratch/after-targets-rotation.log")"
else
  fail "python-tuf did not apply the patches of deltas.json"
fi
racklet validate-2 repo validate --repo "$repo"
if grep -q "1 deltas)" "$scratch/validate-2.log"; then
  pass "repo validate checks the delta index against the signed targets"
else
  fail "repo validate: $(cat "$scratch/validate-2.log")"
fi

# forged NAME KEY_FILE: a copy of the repository whose next targets metadata is
# signed with KEY_FILE (snapshot and timestamp with the real keys), served;
# sets $client_base and $forged_version.
forged() {
  local name="$1" key="$2"
  cp -a "$repo" "$scratch/$name-repo"
  if ! forged_version="$(python3 "$here/forge_targets.py" "$scratch/$name-repo" "$keys" "$key" \
    2>"$scratch/$name-forge.log")"; then
    cat "$scratch/$name-forge.log"
    die "forge_targets.py failed"
  fi
  serve "$scratch/$name-repo"
  client_base="$served_base"
}

forged forged-old-key "$retired_targets_key"
if client_run forged-old-key "$scratch/first.root.json" 2 "$build1" "$build2"; then
  fail "python-tuf accepted targets metadata signed with the retired targets key"
  sed 's/^/     /' "$scratch/forged-old-key.log"
elif grep -q "UnsignedMetadataError: targets was signed by 0/1 keys" "$scratch/forged-old-key.log"; then
  pass "python-tuf (root 1 -> 2) refuses targets version $forged_version signed with the retired targets key"
else
  fail "python-tuf failed for another reason with the old key's targets metadata:"
  sed 's/^/     /' "$scratch/forged-old-key.log"
fi
forged forged-new-key "$new_targets_key"
if client_run forged-new-key "$scratch/first.root.json" 2 "$build1" "$build2" &&
  grep -q "^targets.json version $forged_version lists" "$scratch/forged-new-key.log"; then
  pass "the same forgery signed with the current targets key is accepted (targets version $forged_version): the refusal was the key's"
else
  fail "python-tuf did not take the forgery signed with the current targets key:"
  sed 's/^/     /' "$scratch/forged-new-key.log"
fi
unset client_base

# --- the root keys rotated offline with one of three lost: 2 still sign -------------
rm -f "$(key_files "$offline" root | head -n 1)"
racklet rotate-root keys rotate-root --dir "$offline"
racklet export-3 keys export --dir "$offline" --to "$keys"
no_root_key_in_publishing_keys "after the root rotation"
racklet refresh repo refresh --repo "$repo" --keys "$keys"
client after-root-rotation "$scratch/first.root.json" 3 "$build1" "$build2"
racklet validate-3 repo validate --repo "$repo"

# --- routine publishing never signs root ----------------------------------------------
repo_sums() { (cd "$repo" && find . -type f -exec sha256sum {} + | sort); }
sums_before="$(repo_sums)"
if "$builder" repo refresh --repo "$repo" --keys "$keys" --timestamp-expiry-days 400 \
  >"$scratch/refresh-root-expiring.log" 2>&1; then
  fail "a refresh whose timestamp outlives root version 3 succeeded"
elif grep -q "root version 3 expires at .*before the timestamp.*keys rotate-root" \
  "$scratch/refresh-root-expiring.log"; then
  pass "a refresh that would need a new root is refused: $(grep -o 'root version 3 expires at [^,]*' "$scratch/refresh-root-expiring.log")"
else
  fail "a refresh that would need a new root failed without saying so:"
  sed 's/^/     /' "$scratch/refresh-root-expiring.log"
fi
if [ "$sums_before" = "$(repo_sums)" ]; then
  pass "the refused refresh left the repository as it was"
else
  fail "the refused refresh changed the repository"
fi

# --- the client really checks: a corrupted target must be refused ----------------
# (A synthetic build ships uki-a.efi, a real one uki-a.efi.zst.)
victim="$(find "$repo/targets" \( -name '*-uki-a.efi' -o -name '*-uki-a.efi.zst' \) | head -n 1)"
if [ -n "$victim" ]; then
  # A new file over the old name: the served inode may be shared with a build.
  python3 - "$victim" <<'EOF'
import os, sys
path = sys.argv[1]
data = bytearray(open(path, "rb").read())
data[len(data) // 2] ^= 0x01
with open(path + ".tmp", "wb") as out:
    out.write(data)
os.replace(path + ".tmp", path)
EOF
  if python3 "$here/python_tuf_client.py" \
    --metadata-url "$base/metadata/" --targets-url "$base/targets/" \
    --root "$scratch/first.root.json" "$build1" "$build2" >"$scratch/tampered.log" 2>&1; then
    fail "python-tuf accepted a corrupted $(basename "$victim")"
  elif grep -q "$(basename "$victim" | cut -d. -f2-): download refused" "$scratch/tampered.log"; then
    pass "python-tuf refuses a corrupted target ($(grep -c '^FAIL ' "$scratch/tampered.log") refusal(s))"
  else
    fail "python-tuf failed for another reason with a corrupted target:"
    sed 's/^/     /' "$scratch/tampered.log"
  fi
else
  fail "no *-uki-a.efi or *-uki-a.efi.zst target to corrupt"
fi

echo "$((checks - failures)) passed, $failures failed"
if [ "$failures" -eq 0 ]; then
  echo "PASS: tests/repo: $checks checks (published without the root key; python-tuf downloaded and verified every target of 2 versions and applied the delta's patches, followed root 1 -> 2 (a rotated targets key) -> 3, and refused targets signed with the retired targets key)"
  exit 0
fi
echo "FAIL: tests/repo: $failures of $checks checks failed"
exit 1
