#!/usr/bin/env bash
# Unpack Debian's systemd-resolved (daemon and resolvectl) for tests/interop/test_resolved_dns_control.py
# WITHOUT installing it: installing runs its postinst, which turns the host's /etc/resolv.conf into a
# symlink to the resolved stub and so breaks name resolution on a machine where resolved is not running.
# `apt-get download` + `dpkg-deb -x` runs no maintainer script.
#
# Usage: scripts/fetch_resolved.sh [DEST]   (default: $FZ_RESOLVED_DIR, else /opt/fz-test/resolved)
# Idempotent: does nothing when DEST already holds the version matching the installed systemd.
set -euo pipefail

dest="${1:-${FZ_RESOLVED_DIR:-/opt/fz-test/resolved}}"

if [ "$(id -u)" != 0 ]; then
  echo "fetch_resolved.sh: needs root (apt-get download into the apt cache lists)" >&2
  exit 1
fi

# systemd-resolved depends on exactly the libsystemd-shared of the same version (systemd package).
version="$(dpkg-query -W -f='${Version}' libsystemd-shared 2>/dev/null || true)"
if [ -z "$version" ]; then
  echo "fetch_resolved.sh: libsystemd-shared is not installed (Debian package systemd)" >&2
  exit 1
fi
for tool in dbus-daemon unshare ip; do
  if ! command -v "$tool" >/dev/null; then
    echo "fetch_resolved.sh: $tool is missing (Debian packages dbus-daemon, util-linux, iproute2)" >&2
    exit 1
  fi
done

stamp="$dest/.fz-version"
if [ -x "$dest/lib/systemd/systemd-resolved" ] && [ -x "$dest/usr/bin/resolvectl" ] \
    && [ "$(cat "$stamp" 2>/dev/null)" = "$version" ]; then
  echo "systemd-resolved $version already unpacked in $dest"
  exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# apt drops privileges to _apt for the download; let it write here.
chown _apt "$tmp" 2>/dev/null || true
if ! (cd "$tmp" && apt-get download -q "systemd-resolved=$version" >/dev/null 2>&1); then
  apt-get update -qq
  if ! (cd "$tmp" && apt-get download -q "systemd-resolved=$version" >/dev/null); then
    echo "fetch_resolved.sh: systemd-resolved $version (the installed systemd's version) is not in the" \
         "archive any more; upgrade systemd first: apt-get install --only-upgrade systemd" >&2
    exit 1
  fi
fi
deb=("$tmp"/systemd-resolved_*.deb)
dpkg-deb -x "${deb[0]}" "$tmp/root"

missing="$(ldd "$tmp/root/lib/systemd/systemd-resolved" "$tmp/root/usr/bin/resolvectl" | grep 'not found' || true)"
if [ -n "$missing" ]; then
  echo "fetch_resolved.sh: shared libraries missing:" >&2
  echo "$missing" >&2
  exit 1
fi

echo "$version" >"$tmp/root/.fz-version"
mkdir -p "$(dirname "$dest")"
rm -rf "$dest"
mv "$tmp/root" "$dest"
chmod 755 "$dest"
echo "systemd-resolved $version unpacked in $dest (from $(basename "${deb[0]}"))"
