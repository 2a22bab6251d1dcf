"""The real systemd-resolved (Debian 252, unpacked by scripts/fetch_resolved.sh) on a machine without
systemd as PID 1, isolated from the host.

How a node gets its own resolved
--------------------------------
Installing the systemd-resolved package would turn the host's /etc/resolv.conf into a symlink to
the resolved stub, so the package is only unpacked (see scripts/fetch_resolved.sh). Every process
of a node -- dbus-daemon, systemd-resolved, resolvectl, the fz code under test -- is started in the
node's network namespace through :meth:`ResolvedNode.wrap`, which first enters a private mount
namespace and bind-mounts directories of the test over:

- ``/run/dbus``: the private system bus socket (resolvectl and sd-bus use
  /run/dbus/system_bus_socket);
- ``/run/systemd``: resolved's ``/run/systemd/resolve/{resolv.conf,stub-resolv.conf}``; this also
  hides the host's /run/systemd/netif, so resolved sees no networkd-managed links;
- ``/etc/passwd`` and ``/etc/group``: copies with a ``systemd-resolve`` user added, which resolved
  started as root drops to (and which the package's D-Bus policy lets own org.freedesktop.resolve1);
- optionally ``/etc/resolv.conf``: the "foreign" file resolved imports its global DNS servers from.

Only these paths are replaced, not the whole of /run: the lab keeps its state and the client's
control socket under /run/fz-lab, and the client its DNS backup under /run/firezone. The host's
files are never written; the bind mounts vanish with the processes.

The module doubles as the in-namespace agent (``python resolved_harness.py agent ...``): it plays
the DNS half of ``fz client up`` -- a TUN with the sentinel addresses, the DNS stub served on them,
``dns_control.apply("systemd-resolved", ...)`` -- and answers commands on stdin with JSON lines.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESOLVED_DIR = Path(os.environ.get("FZ_RESOLVED_DIR", "/opt/fz-test/resolved"))
FETCH_HINT = "run `bash scripts/fetch_resolved.sh` (as root) first"

_BUS_CONF = """\
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=/run/dbus/system_bus_socket</listen>
  <auth>EXTERNAL</auth>
  <!-- The stock system-bus default policy: services punch their own holes (system.d). -->
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
  <includedir>{policy_dir}</includedir>
</busconfig>
"""

# Runs as `sh -c _BIND_SCRIPT sh WORKDIR argv...` inside a fresh private mount namespace.
_BIND_SCRIPT = """\
set -e
w="$1"; shift
mount --bind "$w/run-dbus" /run/dbus
mount --bind "$w/run-systemd" /run/systemd
mount --bind "$w/passwd" /etc/passwd
mount --bind "$w/group" /etc/group
if [ -f "$w/resolv.conf" ]; then mount --bind "$w/resolv.conf" /etc/resolv.conf; fi
exec "$@"
"""


class ResolvedFiles:
    """The unpacked package; fails loudly (never skips) when scripts/fetch_resolved.sh was not run."""

    def __init__(self, root: Path = RESOLVED_DIR) -> None:
        self.root = root
        self.daemon = root / "lib/systemd/systemd-resolved"
        self.bindir = root / "usr/bin"
        self.resolvectl = self.bindir / "resolvectl"
        self.policy_dir = root / "usr/share/dbus-1/system.d"
        missing = [str(p) for p in (self.daemon, self.resolvectl, self.policy_dir / "org.freedesktop.resolve1.conf")
                   if not p.exists()]
        assert not missing, f"systemd-resolved is not unpacked ({', '.join(missing)} missing): {FETCH_HINT}"
        for tool, pkg in (("dbus-daemon", "dbus-daemon"), ("unshare", "util-linux"), ("ip", "iproute2")):
            assert shutil.which(tool), f"{tool} is not installed (Debian package {pkg})"
        self.version = (root / ".fz-version").read_text().strip() if (root / ".fz-version").exists() else "?"


def _free_system_id(start: int = 990) -> int:
    used_u = {p.pw_uid for p in pwd.getpwall()}
    used_g = set()
    with contextlib.suppress(OSError):
        for line in Path("/etc/group").read_text().splitlines():
            parts = line.split(":")
            if len(parts) > 2 and parts[2].isdigit():
                used_g.add(int(parts[2]))
    for i in range(start, 100, -1):
        if i not in used_u and i not in used_g:
            return i
    raise RuntimeError("no free system uid/gid for systemd-resolve")


Popen = Callable[[list[str], str, dict[str, str]], subprocess.Popen[Any]]


class ResolvedNode:
    """dbus-daemon + systemd-resolved serving one network namespace, with private /run views.

    ``enter(argv)`` returns the argv that runs ``argv`` in the namespace (``ip netns exec NS ...``);
    ``popen(argv, name, env)`` starts a long-running process whose stop the caller's fixture owns
    (Topology or Lab); processes are stopped by PID through those.
    """

    def __init__(self, files: ResolvedFiles, workdir: Path, enter: Callable[[Sequence[str]], list[str]],
                 popen: Popen, *, resolv_conf: str | None = None) -> None:
        self.files = files
        self.workdir = workdir
        self.enter = enter
        self._popen = popen
        self.dbus: subprocess.Popen[Any] | None = None
        self.resolved: subprocess.Popen[Any] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "run-dbus").mkdir(exist_ok=True)
        (workdir / "run-systemd").mkdir(exist_ok=True)
        uid = _free_system_id()
        passwd = Path("/etc/passwd").read_text()
        group = Path("/etc/group").read_text()
        if "\nsystemd-resolve:" not in "\n" + passwd:
            passwd = passwd.rstrip("\n") + f"\nsystemd-resolve:x:{uid}:{uid}:systemd Resolver:/:/usr/sbin/nologin\n"
        if "\nsystemd-resolve:" not in "\n" + group:
            group = group.rstrip("\n") + f"\nsystemd-resolve:x:{uid}:\n"
        (workdir / "passwd").write_text(passwd)
        (workdir / "group").write_text(group)
        if resolv_conf is not None:
            (workdir / "resolv.conf").write_text(resolv_conf)
        (workdir / "bus.conf").write_text(_BUS_CONF.format(policy_dir=files.policy_dir))
        # Paths inside the node (the bind mounts) and the same files seen from the host.
        self.bus_socket = workdir / "run-dbus" / "system_bus_socket"
        self.resolve_dir = workdir / "run-systemd" / "resolve"

    # -- commands ---------------------------------------------------------------------------

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` with the private views, to be run inside the node's namespace."""
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _BIND_SCRIPT, "sh",
                str(self.workdir), *map(str, argv)]

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment for the node's processes: ``extra`` over ours, the unpacked resolvectl first
        on PATH, and nothing that would point sd-bus or sd_notify elsewhere."""
        env = {**os.environ, **(extra or {})}
        for k in ("DBUS_SYSTEM_BUS_ADDRESS", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(k, None)
        env["PATH"] = f"{self.files.bindir}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
        return env

    def command(self, argv: Sequence[str]) -> list[str]:
        """The full argv (from the host) running ``argv`` in the node with the private views."""
        return self.enter(self.wrap(argv))

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 20,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(self.command(argv), capture_output=True, text=True, timeout=timeout, input=input,
                           env=self.env(), check=False)
        if check and p.returncode != 0:
            raise AssertionError(f"{shlex.join(argv)} exited {p.returncode}:\n{p.stdout}{p.stderr}\n"
                                 f"--- resolved log ---\n{self.log()[-3000:]}")
        return p

    def resolvectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run([str(self.files.resolvectl), "--no-pager", *args], check=check)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, timeout: float = 15) -> None:
        self.dbus = self._popen(self.wrap(["dbus-daemon", f"--config-file={self.workdir / 'bus.conf'}",
                                           "--nofork", "--nopidfile", "--nosyslog"]), "dbus-daemon", self.env())
        self._wait(lambda: self.bus_socket.exists(), timeout, "the private system bus socket", self.dbus)
        self.resolved = self._popen(
            self.wrap([str(self.files.daemon)]), "systemd-resolved",
            self.env({"SYSTEMD_LOG_LEVEL": "debug", "SYSTEMD_LOG_TARGET": "console", "SYSTEMD_LOG_COLOR": "0"}))
        self._wait(lambda: self.resolvectl("status", check=False).returncode == 0, timeout,
                   "systemd-resolved on the bus", self.resolved)

    def _wait(self, pred: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen[Any]) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            if proc.poll() is not None:
                raise AssertionError(f"{what}: the process exited ({proc.returncode}):\n{self.log()[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}:\n{self.log()[-3000:]}")

    def log(self) -> str:
        """What resolved printed (its Popen's log_path, set by Lab.popen or our own popen)."""
        path = getattr(self.resolved, "log_path", None)
        return Path(path).read_text(errors="replace") if path and Path(path).exists() else ""

    def resolv_conf(self) -> str:
        """resolved's /run/systemd/resolve/resolv.conf (all known upstreams), seen from the host."""
        return (self.resolve_dir / "resolv.conf").read_text()


# -- the agent ---------------------------------------------------------------------------------------

def _agent(tun_name: str, state_dir: str, search: str, resources: str) -> None:
    import asyncio
    import ipaddress
    import json

    from firezone.proto.dns.stub import DnsStub
    from firezone.roles.client import _add_sentinel_addresses
    from firezone.runtime import dns_control, netlink, tun
    from firezone.runtime.dns_listen import DnsServer

    def say(**kw: Any) -> None:
        print(json.dumps(kw), flush=True)

    async def main() -> None:
        fd, name = tun.open_tun(tun_name)
        seen: list[dict[str, Any]] = []
        server: DnsServer | None = None
        restorer = None
        try:
            with contextlib.suppress(OSError):
                Path(f"/proc/sys/net/ipv6/conf/{name}/accept_dad").write_text("0\n")
            stub = DnsStub(search_domain=search or None)
            upstreams = dns_control.system_upstreams(mode="systemd-resolved", state_dir=Path(state_dir))
            sentinels = stub.set_upstreams(upstreams)
            stub.set_resources([(f"r{i}", p) for i, p in enumerate(resources.split(",")) if p])
            # Like the client: a tunnel address first, then the sentinels, link up.
            # (pyroute2's synchronous API cannot run inside a running event loop: a thread, as the client.)
            await asyncio.to_thread(netlink.configure_interface, name, mtu=tun.DEFAULT_MTU, addresses=[
                ipaddress.ip_interface("100.64.0.2/32"), ipaddress.ip_interface("fd00:2021:1111::2/128")])
            await asyncio.to_thread(_add_sentinel_addresses, name, sentinels)

            def handler(data: bytes, *, sentinel: str, tcp: bool, now: float) -> Any:
                with contextlib.suppress(Exception):
                    import dns.message
                    q = dns.message.from_wire(data)
                    seen.append({"name": q.question[0].name.to_text(), "sentinel": sentinel, "tcp": tcp})
                return stub.handle_query(data, sentinel=sentinel, tcp=tcp, now=now)

            server = DnsServer(handler, asyncio.get_running_loop())
            for s in sentinels:
                for attempt in range(50):  # a fresh IPv6 address may not be bindable at once
                    try:
                        await server.start([s])
                        break
                    except OSError:
                        if attempt == 49:
                            raise
                        await asyncio.sleep(0.1)
            restorer = await asyncio.to_thread(dns_control.apply, "systemd-resolved", sentinels, search or None,
                                               interface=name, state_dir=Path(state_dir))
            say(event="applied", interface=name, sentinels=sentinels, upstreams=upstreams)
            while True:
                line = (await asyncio.to_thread(sys.stdin.readline)).strip()
                if line == "queries":
                    say(event="queries", queries=seen)
                elif line == "restore":
                    await asyncio.to_thread(restorer.restore)
                    say(event="restored")
                elif line in ("", "exit"):
                    break
                else:
                    say(event="error", error=f"unknown command {line!r}")
        except Exception as e:
            say(event="error", error=f"{type(e).__name__}: {e}")
            raise
        finally:
            if restorer is not None:
                restorer.restore()
            if server is not None:
                server.close()
            os.close(fd)

    asyncio.run(main())


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "agent":
        _agent(*sys.argv[2:])
    else:
        sys.exit("usage: resolved_harness.py agent TUN_NAME STATE_DIR SEARCH_DOMAIN RESOURCE,...")
