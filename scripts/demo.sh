#!/usr/bin/env bash
# The main job: install fz and start a working demo portal on this machine, seeded with a site,
# resources, a group, users and a policy, so every admin command can be tried right away.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh

demo=${FZ_DEMO_DIR:-/var/lib/fz-demo}
listen=${FZ_DEMO_LISTEN:-127.0.0.1:8080}
url="http://$listen"
fz=.venv/bin/fz

if [ ! -f "$demo/portal.db" ]; then
  $fz portal init --data-dir "$demo" --account demo --account-name "Demo Inc." --admin-email admin@demo.test --url "$url"
  fresh=1
else
  fresh=0
fi
if curl -fsS "$url/healthz" >/dev/null 2>&1; then
  echo "a portal already answers at $url"
else
  nohup $fz portal serve --data-dir "$demo" --listen "$listen" >"$demo/portal.log" 2>&1 &
  echo $! >"$demo/portal.pid"
  for _ in $(seq 50); do curl -fsS "$url/healthz" >/dev/null 2>&1 && break; sleep 0.2; done
  curl -fsS "$url/healthz" >/dev/null || { echo "portal did not start; see $demo/portal.log" >&2; exit 1; }
fi
if [ "$fresh" = 1 ]; then
  $fz site add HQ
  $fz resource add httpbin --site HQ --address 198.51.100.10 --filter tcp/80 --filter icmp
  $fz resource add private-dns --site HQ --address '**.httpbin.test' --description "internal web apps"
  $fz group add Engineering
  $fz user add alice@demo.test --name Alice
  $fz user add bob@demo.test --name Bob
  $fz group add-member Engineering alice@demo.test
  $fz policy add --group Engineering --resource httpbin --description "engineers reach httpbin"
  $fz policy add --group Engineering --resource private-dns \
      --condition "time in M-F/08:00-18:00/Europe/Berlin"
fi
cat <<MSG

fz demo portal running at $url (pid $(cat "$demo/portal.pid" 2>/dev/null || echo '?'), log $demo/portal.log)
Try:
  fz user list
  fz resource list
  fz policy list
  fz policy explain --user alice@demo.test --resource httpbin
  fz policy explain --user bob@demo.test --resource httpbin        # denied: exit code 3
  fz --json audit list
  curl $url/api/openapi.json
Stop it with: kill \$(cat $demo/portal.pid)
MSG
