#!/usr/bin/env bash
# Install what the tests (not the build) need, only what is missing:
# promtool (checks the agent's metrics), dbus-daemon (a private bus for the
# agent's D-Bus API), rauc (Debian's RAUC CLI against the agent's
# de.pengutronix.rauc API; the package is the CLI alone: no service, no
# unit, no D-Bus policy, its postinst starts nothing), python-tuf +
# cryptography (the second TUF client).
set -euo pipefail

packages=(
  prometheus       # promtool check metrics
  dbus-daemon      # a private bus in the agent's tests
  python3-venv
  faketime         # the publisher signs "in the past" for expired-metadata tests
  python3-prometheus-client  # a strict OpenMetrics parser in the metrics test
  openssh-client   # ssh-keygen: throwaway keys for the settings tests
  rauc             # the RAUC CLI in tests/agent (rauc_cli_* cases)
)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "test-tools: installing ${missing[*]}" >&2
  if [ "$(id -u)" -ne 0 ]; then
    echo "test-tools: need root to apt-get install ${missing[*]}" >&2
    exit 2
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! python3 -c 'import tuf.ngclient, cryptography' 2>/dev/null; then
  echo "test-tools: installing python-tuf and cryptography from PyPI" >&2
  python3 -m pip install --quiet --disable-pip-version-check 'tuf>=5' cryptography
fi
