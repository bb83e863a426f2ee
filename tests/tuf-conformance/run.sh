#!/usr/bin/env bash
# Run the TUF conformance test suite (theupdateframework/tuf-conformance)
# against racklet-tuf-conformance, the suite's client CLI (CLIENT-CLI.md) over
# the update agent's own TUF client (update-agent/src/tuf.rs, i.e. tough).
#
# The suite is not published on PyPI; it runs from a checkout:
#   tests/tuf-conformance/run.sh [SUITE_CHECKOUT] [PYTEST_ARGS...]
# With no checkout given (nor TUF_CONFORMANCE_DIR), it is cloned from GitHub
# into build/tuf-conformance/ (which needs GitHub to be reachable).
# Its Python dependencies (tuf, securesystemslib[crypto], pytest) come from
# PyPI into a virtualenv in build/tuf-conformance/venv.
#
# Needs python3 >= 3.10 with venv, cargo, and `faketime` (Debian package
# faketime; the expiry tests run the client under it).
#
# Tests listed in expected-failures.txt (where tough deviates from the spec)
# are strict xfails: they must fail, and one that starts passing is reported.
# Environment: RACKLET_TUF_CONFORMANCE=path/to/binary skips the cargo build.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
work="$root/build/tuf-conformance"

die() {
  echo "FAIL: tests/tuf-conformance: $*" >&2
  exit 1
}

suite="${TUF_CONFORMANCE_DIR:-}"
if [ $# -gt 0 ] && [ -d "$1" ]; then
  suite="$1"
  shift
fi
mkdir -p "$work"
if [ -z "$suite" ]; then
  suite="$work/suite"
  if [ ! -d "$suite/tuf_conformance" ]; then
    git clone --depth 1 https://github.com/theupdateframework/tuf-conformance "$suite" ||
      die "cannot clone the suite; pass a checkout: $0 PATH/TO/tuf-conformance"
  fi
fi
suite="$(cd "$suite" && pwd)"
[ -d "$suite/tuf_conformance" ] || die "$suite is not a tuf-conformance checkout"
command -v faketime >/dev/null ||
  echo "warning: faketime is not installed; the expiry tests will fail (apt-get install faketime)" >&2

# --- the client under test --------------------------------------------------
if [ -n "${RACKLET_TUF_CONFORMANCE:-}" ]; then
  client="$RACKLET_TUF_CONFORMANCE"
else
  echo "building racklet-tuf-conformance (cargo build -p update-agent)"
  (cd "$root" && cargo build --quiet -p update-agent --bin racklet-tuf-conformance) ||
    die "cargo build failed"
  target_dir="$(cd "$root" && cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
  client="$target_dir/debug/racklet-tuf-conformance"
fi
[ -x "$client" ] || die "$client is not executable"

# --- the suite ----------------------------------------------------------------
if [ ! -x "$work/venv/bin/pytest" ]; then
  python3 -m venv "$work/venv" || die "python3 -m venv failed"
fi
"$work/venv/bin/pip" install --quiet "$suite" || die "pip install $suite failed"

expected_failures="$(sed -e 's/#.*//' "$here/expected-failures.txt" | xargs echo)"
args=(--entrypoint "$client" -p no:cacheprovider -rfEX)
if [ -n "$expected_failures" ]; then
  args+=(--expected-failures "$expected_failures")
fi
cd "$work"
exec "$work/venv/bin/pytest" "$suite/tuf_conformance" "${args[@]}" "$@"
