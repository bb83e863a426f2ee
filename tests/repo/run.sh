#!/usr/bin/env bash
# A second TUF client against the repository `racklet-image publish` writes:
# publish two versions with throwaway keys, serve the repository with
# `python3 -m http.server` on 127.0.0.1, and download every target with
# python-tuf's ngclient, checking each file's sha256 against the build's
# manifest.json. Then rotate the root, refresh the repository, and check that
# a client bootstrapped with 1.root.json follows the rotation to version 2.
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
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null
    wait "$server_pid" 2>/dev/null
  fi
  rm -rf "$scratch"
}
trap cleanup EXIT

export RACKLET_LOG=warn
keys="$scratch/keys"
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

racklet keys-generate keys generate --dir "$keys" || die "cannot make keys"
racklet publish-1 publish --build "$build1" --repo "$repo" --keys "$keys" || die "publish failed"
racklet publish-2 publish --build "$build2" --repo "$repo" --keys "$keys" \
  --wave 512@+0h --wave 2048@+1d || die "publish failed"
racklet validate-1 repo validate --repo "$repo"

# --- serve it on a free port of 127.0.0.1 ----------------------------------------
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
python3 -m http.server --bind 127.0.0.1 --directory "$repo" "$port" >"$scratch/http.log" 2>&1 &
server_pid=$!
base="http://127.0.0.1:$port"
for _ in $(seq 1 50); do
  python3 -c "import urllib.request; urllib.request.urlopen('$base/metadata/1.root.json')" \
    2>/dev/null && break
  kill -0 "$server_pid" 2>/dev/null || die "http.server exited: $(cat "$scratch/http.log")"
  sleep 0.1
done

# client NAME ROOT EXPECTED_ROOT_VERSION: python-tuf from ROOT, every target.
client() {
  local name="$1" bootstrap="$2" expected="$3"
  # The trust anchor is copied: the repository directory is swapped on every change.
  cp "$bootstrap" "$scratch/$name.root.json"
  if python3 "$here/python_tuf_client.py" \
    --metadata-url "$base/metadata/" --targets-url "$base/targets/" \
    --root "$scratch/$name.root.json" --expect-root-version "$expected" \
    "$build1" "$build2" >"$scratch/$name.log" 2>&1; then
    pass "python-tuf ($name): $(tail -n 1 "$scratch/$name.log")"
    grep -E '^(bootstrapped|targets.json)' "$scratch/$name.log" | sed 's/^/     /'
  else
    fail "python-tuf ($name):"
    sed 's/^/     /' "$scratch/$name.log"
  fi
}

client before-rotation "$repo/metadata/1.root.json" 1

# --- root rotation: python-tuf must follow 1 -> 2 ---------------------------------
cp "$repo/metadata/1.root.json" "$scratch/first.root.json"
racklet rotate keys rotate-root --dir "$keys"
racklet refresh repo refresh --repo "$repo" --keys "$keys"
if [ -f "$repo/metadata/2.root.json" ]; then
  pass "metadata/2.root.json published"
else
  fail "metadata/2.root.json is missing after rotate-root + refresh"
fi
if cmp -s "$repo/metadata/1.root.json" "$scratch/first.root.json"; then
  pass "metadata/1.root.json unchanged by the rotation"
else
  fail "metadata/1.root.json changed"
fi
client after-rotation "$scratch/first.root.json" 2
racklet validate-2 repo validate --repo "$repo"

# --- the client really checks: a corrupted target must be refused ----------------
victim="$(find "$repo/targets" -name '*-uki-a.efi' | head -n 1)"
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
  fail "no *-uki-a.efi target to corrupt"
fi

echo "$((checks - failures)) passed, $failures failed"
if [ "$failures" -eq 0 ]; then
  echo "PASS: tests/repo: $checks checks (python-tuf $tuf_version downloaded and verified every target of 2 published versions, and followed root 1 -> 2)"
  exit 0
fi
echo "FAIL: tests/repo: $failures of $checks checks failed"
exit 1
