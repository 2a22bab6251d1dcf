#!/usr/bin/env bash
# The main job: install fz and start the whole system on this machine in network namespaces
# (`fz lab up`): portal, two relays, two gateways of one site, two signed-in clients and the
# resource hosts, with an account seeded with users, groups, resources and policies. Then prove
# it works.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH"

prefix=${FZ_DEMO_PREFIX:-fzdemo}
# A second run replaces the demo lab of the first one (and only that one).
fz lab down --prefix "$prefix" >/dev/null 2>&1 || true
fz lab up --prefix "$prefix"

echo
echo "\$ fz lab exec client -- curl -s http://dns.httpbin.test/"
answer=$(fz lab exec --prefix "$prefix" client -- curl -sS -m 20 http://dns.httpbin.test/)
echo "$answer"
if [ "$answer" != "dns-host" ]; then
  echo "demo: the client did not reach the DNS resource; logs in /run/fz-lab/$prefix/logs" >&2
  exit 1
fi
cat <<MSG

fz runs in lab $prefix: the client (signed in as alice@acme.test) just reached dns.httpbin.test
through a gateway. Try:
  fz lab exec client -- curl http://dns.httpbin.test/
  fz lab exec client -- curl http://198.51.100.10/
  fz lab exec client -- fz client status
  fz lab exec client-2 -- fz client status     # bob (group sales): no resources
  fz lab exec client -- fz client internet on  # then: fz lab exec client -- curl http://www.example.test/ip
  fz lab exec portal -- fz policy list
  fz lab exec portal -- fz policy explain --user bob@acme.test --resource dns-host   # denied: exit 3
  fz lab status        # processes and the log directory
  fz lab down          # removes everything
(With more than one lab up, add --prefix $prefix after "fz lab exec".)
MSG
