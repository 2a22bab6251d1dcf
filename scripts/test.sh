#!/usr/bin/env bash
# Run the whole test suite (unit, simulation, API/CLI, interop with real peers, end-to-end in
# network namespaces, browser). Needs root and the packages scripts/install.sh --test installs.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in wireguard-go wg turnserver turnutils_uclient nft dnsmasq dig iperf3 ping chromium; do
  command -v "$tool" >/dev/null || { echo "test.sh: missing $tool: run scripts/install.sh --test" >&2; exit 1; }
done
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
