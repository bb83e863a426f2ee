#!/usr/bin/env bash
# Run the TUF conformance test suite (theupdateframework/tuf-conformance)
# against racklet-tuf-conformance, the suite's client CLI (CLIENT-CLI.md) over
# the update agent's own TUF client (update-agent/src/tuf.rs and
# tuf_workflow.rs: the spec's client workflow on tough's key types).
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
# Tests listed in expected-failures.txt (each with its reason) are strict
# xfails: they must fail, and one that starts passing fails the run.
# Environment: RACKLET_TUF_CONFORMANCE=path/to/binary skips the cargo build
# (a relative path is taken from the current directory).
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
# The copy kept beside the work tree on our machines (../shared, ORIGIN.txt).
if [ -z "$suite" ]; then
  for candidate in "$root/../shared/tuf-conformance" /work/shared/tuf-conformance; do
    if [ -d "$candidate/tuf_conformance" ]; then
      suite="$candidate"
      break
    fi
  done
fi
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
  # The suite runs from $work: make the path absolute first.
  client="$(realpath -- "$RACKLET_TUF_CONFORMANCE")" ||
    die "$RACKLET_TUF_CONFORMANCE does not exist"
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
# A writable copy (the checkout may be read-only, as ../shared is in CI).
copy="$work/suite-copy"
rm -rf "$copy"
cp -R "$suite/." "$copy" && chmod -R u+w "$copy" || die "cannot copy $suite to $copy"
if [ ! -x "$work/venv/bin/pytest" ]; then
  python3 -m venv "$work/venv" || die "python3 -m venv failed"
fi
"$work/venv/bin/pip" install --quiet "$copy" || die "pip install $copy failed"

# The suite reads its expected failures from ENTRYPOINT.xfails (one test name
# a line) and marks them strict xfails; the entrypoint is split on spaces.
entry_dir="$work/entrypoint"
entry="$entry_dir/racklet-tuf-conformance"
case "$entry" in *" "*) die "$entry: the suite cannot run a client whose path has a space" ;; esac
mkdir -p "$entry_dir"
ln -sfn "$client" "$entry"
sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e '/^$/d' "$here/expected-failures.txt" >"$entry.xfails"
if [ -s "$entry.xfails" ]; then
  echo "expected failures (strict): $(xargs echo <"$entry.xfails")"
fi
cd "$work"
# pytest's summary, then ours in the form tests/run-all.sh counts.
set +e
"$work/venv/bin/pytest" "$copy/tuf_conformance" --entrypoint "$entry" \
  -p no:cacheprovider -rfEX "$@" | tee "$work/pytest.log"
code=${PIPESTATUS[0]}
set -e
summary="$(grep -E '^=+ .*(passed|failed).* in [0-9.]+s' "$work/pytest.log" | tail -n 1)"
passed="$(sed -nE 's/.* ([0-9]+) passed.*/\1/p' <<<"$summary")"
failed="$(sed -nE 's/.* ([0-9]+) failed.*/\1/p' <<<"$summary")"
xpassed="$(sed -nE 's/.* ([0-9]+) xpassed.*/\1/p' <<<"$summary")"
errors="$(sed -nE 's/.* ([0-9]+) errors?.*/\1/p' <<<"$summary")"
echo "conformance: ${passed:-0} passed, $(( ${failed:-0} + ${xpassed:-0} + ${errors:-0} )) failed"
exit "$code"
