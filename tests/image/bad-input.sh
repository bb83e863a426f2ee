#!/usr/bin/env bash
# Bad input: each case ends with a non-zero exit and one clear message, and
# nothing that looks complete is left in <output>/<variant>/.
# Every case runs the real builder against a scratch copy of the project's
# data (variants/, packages/, kernel-config/) with one thing broken.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$here/lib.sh"
root="$(project_root)"
builder="${RACKLET_IMAGE:-$root/target/release/racklet-image}"
variant=qemu-x86_64
triple=x86_64-unknown-linux-gnu
real_cache="${RACKLET_CACHE:-$HOME/.cache/racklet}"

# Every scratch project and cache lives under one directory, removed at the end.
scratch_root=""
scratch_dir() { mktemp -d "$scratch_root/case.XXXXXX"; }

scratch_project() {
  local dir; dir="$(scratch_dir)"
  cp -r "$root/variants" "$root/packages" "$root/kernel-config" "$dir/"
  echo "$dir"
}

# A cache holding links to every blob of the real cache, so a case that must
# not download anything does not; `except` leaves one blob out.
linked_cache() {
  local dir except="${1:-}"; dir="$(scratch_dir)"
  mkdir -p "$dir/blobs/sha256"
  for blob in "$real_cache"/blobs/sha256/*; do
    [ "$(basename "$blob")" = "$except" ] || ln -s "$blob" "$dir/blobs/sha256/"
  done
  echo "$dir"
}

# expect_failure NAME PROJECT PATTERN [ENV...] [-- EXTRA BUILDER ARGS]
expect_failure() {
  local name="$1" project="$2" pattern="$3"; shift 3
  local environment=() extra=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do environment+=("$1"); shift; done
  [ "${1:-}" = "--" ] && { shift; extra=("$@"); }
  local output_dir="$project/build" log="$project/log" status=0
  env "${environment[@]}" RACKLET_NO_PROGRESS=1 "$builder" --project "$project" build --variant "$variant" \
    --output "$output_dir" --binaries "$root/target/image/$triple/release" \
    --init "$root/target/init/$triple/release/racklet-init" "${extra[@]}" > "$log" 2>&1 || status=$?
  if [ "$status" -eq 0 ]; then
    fail "$name" "the build succeeded; expected a failure"
  elif ! grep -Eq "$pattern" "$log"; then
    fail "$name" "exit $status but the message does not match /$pattern/: $(grep -m3 error "$log")"
  elif [ -e "$output_dir/$variant" ]; then
    fail "$name" "$output_dir/$variant was left behind"
  elif compgen -G "$output_dir/.$variant.work-*" > /dev/null; then
    fail "$name" "a work directory was left in $output_dir"
  else
    pass "$name: $(grep -m1 '^error:' "$log" | cut -c1-160)"
  fi
}

run_bad_input_tests() {
  local project cache sha
  scratch_root="$(mktemp -d /tmp/racklet-bad-input.XXXXXX)"

  project="$(scratch_project)"
  printf 'name = "qemu-x86_64"\narch = [\n' > "$project/variants/$variant/variant.toml"
  expect_failure "malformed variant TOML names the file and line" "$project" "variants/$variant/variant.toml: line [0-9]+: invalid array"

  project="$(scratch_project)"
  sed -i 's/^k3s = "optional"/k3s = "optional"\ncolour = "blue"/' "$project/variants/$variant/variant.toml"
  expect_failure "unknown variant key is named" "$project" "variant.toml: .*unknown field \`colour\`"

  project="$(scratch_project)"
  sed -i '/^arch = /d' "$project/variants/$variant/variant.toml"
  expect_failure "missing variant key is named" "$project" "variant.toml: .*missing field \`arch\`"

  project="$(scratch_project)"
  sed -i 's/"less",/"less", "no-such-package-racklet",/' "$project/packages/base.toml"
  expect_failure "unknown package is not locked" "$project" "no lock entry for Debian package \`no-such-package-racklet\`; run \`make lock variant=$variant\`"

  project="$(scratch_project)"
  printf '[options]\nCONFIG_RACKLET_DOES_NOT_EXIST = "built-in"\n' >> /dev/null
  sed -i 's/^\[options\]/[options]\nCONFIG_RACKLET_DOES_NOT_EXIST = "built-in"/' "$project/kernel-config/$variant.toml"
  expect_failure "missing kernel option is named" "$project" "CONFIG_RACKLET_DOES_NOT_EXIST \(want built-in \(=y\), found not set\)"

  # A .deb whose sha256 differs from the lock: the lock pins a wrong hash for
  # base-files, whose real blob is therefore "missing" and gets downloaded.
  project="$(scratch_project)"
  sha="$(grep -A7 '^name = "base-files"' "$project/variants/$variant/packages.lock" | sed -n 's/^sha256 = "\(.*\)"/\1/p')"
  sed -i "s/$sha/$(printf '0%.0s' {1..64})/" "$project/variants/$variant/packages.lock"
  cache="$(linked_cache)"
  expect_failure "a .deb whose sha256 differs from the lock is refused" "$project" "base-files .*sha256 mismatch: the lock pins 0{64} but .* served $sha" "RACKLET_CACHE=$cache"
  [ ! -e "$cache/blobs/sha256/$(printf '0%.0s' {1..64})" ] && pass "the mismatching .deb did not enter the cache" || fail "mismatching .deb cached" "it is in $cache"

  # A pin that has left the archive (the server answers 404).
  project="$(scratch_project)"
  sed -i 's|^filename = "pool/main/b/base-files/.*"|filename = "pool/main/b/base-files/base-files_0.0-racklet-gone_amd64.deb"|' "$project/variants/$variant/packages.lock"
  sha="$(grep -A7 '^name = "base-files"' "$project/variants/$variant/packages.lock" | sed -n 's/^sha256 = "\(.*\)"/\1/p')"
  cache="$(linked_cache "$sha")"
  expect_failure "a pin that left Debian's archive says how to re-lock" "$project" "has left Debian's archive .*make lock variant=$variant" "RACKLET_CACHE=$cache"

  # Offline with an empty cache: names the file, the URL and where to put it.
  project="$(scratch_project)"
  cache="$(scratch_dir)"
  expect_failure "offline build with an empty cache names file, URL and cache path" "$project" \
    "Debian package .* is not in the cache and cannot be fetched offline: download .*pool/.*\.deb.* and put it at $cache/blobs/sha256/[0-9a-f]{64}" \
    "RACKLET_CACHE=$cache" "RACKLET_OFFLINE=1"

  # Official k3s offline: names k3s's URL and the cache path.
  project="$(scratch_project)"
  cache="$(linked_cache)"
  expect_failure "offline k3s names its URL and cache path" "$project" \
    "k3s v[0-9.]+\+k3s[0-9] for x86_64 is not in the cache .*https://github.com/k3s-io/k3s/releases/download/.* and put it at $cache/blobs/sha256/" \
    "RACKLET_CACHE=$cache" "RACKLET_OFFLINE=1" -- --k3s official

  project="$(scratch_project)"
  sed -i 's/^verity = 64/verity = 1/' "$project/variants/$variant/variant.toml"
  expect_failure "a verity partition too small for the root is refused" "$project" "partitions.verity.*cannot hold the hash tree"

  # Plain http:// to another machine without the variant's allow_insecure_http:
  # refused before anything is built (the image's agent would refuse it).
  project="$(scratch_project)"
  sed -i '/^allow_insecure_http = true/d' "$project/variants/$variant/variant.toml"
  expect_failure "a plain http:// update URL to another machine is refused" "$project" \
    "update.metadata_url.*'http://10.0.2.100/metadata/' is plain http:// to another machine.*allow_insecure_http = true"

  # An existing good build is left as it was when a rebuild fails.
  project="$(scratch_project)"
  mkdir -p "$project/build/$variant"
  echo previous > "$project/build/$variant/manifest.json"
  sed -i 's/^\[options\]/[options]\nCONFIG_RACKLET_DOES_NOT_EXIST = "built-in"/' "$project/kernel-config/$variant.toml"
  RACKLET_NO_PROGRESS=1 "$builder" --project "$project" build --variant "$variant" --output "$project/build" \
    --binaries "$root/target/image/$triple/release" --init "$root/target/init/$triple/release/racklet-init" > /dev/null 2>&1
  check "a failed rebuild leaves the previous build untouched" grep -qx previous "$project/build/$variant/manifest.json"
  rm -rf "$scratch_root"
  scratch_root=""
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  run_bad_input_tests
  summary
fi
