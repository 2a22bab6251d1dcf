#!/usr/bin/env bash
# Install fz and what it needs on Debian 12: system packages, a venv with fz, and (with --test)
# the test tools: real WireGuard, TURN, DNS and browser peers, the OpenID provider from npm.
set -euo pipefail
cd "$(dirname "$0")/.."

want_tests=0
[ "${1:-}" = "--test" ] && want_tests=1

if [ "$(id -u)" != 0 ]; then
  echo "install.sh: needs root (apt-get, network namespaces, TUN)" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# What every role needs at run time: ip, nft, ping, dig, curl; plus the lab's servers.
pkgs=(iproute2 nftables iputils-ping bind9-dnsutils curl ca-certificates procps dnsmasq-base iperf3)
if [ "$want_tests" = 1 ]; then
  # Real peers the tests talk to.
  pkgs+=(wireguard-go wireguard-tools coturn dnsperf chromium)
  # systemd (its libsystemd-shared must match the systemd-resolved unpacked below) and a D-Bus
  # daemon for the private bus that resolved and resolvectl talk over in the tests.
  pkgs+=(systemd dbus-daemon util-linux)
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null

python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
if [ "$want_tests" = 1 ]; then
  .venv/bin/pip install -q -e '.[test]'
  if [ -f tests/oidc/package-lock.json ]; then
    (cd tests/oidc && npm ci --silent --no-audit --no-fund)
  fi
  # The real systemd-resolved, unpacked (never installed: its postinst would take over
  # this machine's /etc/resolv.conf).
  bash scripts/fetch_resolved.sh
else
  .venv/bin/pip install -q -e .
fi
ln -sf "$PWD/.venv/bin/fz" /usr/local/bin/fz
echo "installed: $(.venv/bin/fz --version)"
