"""The whole fz system in a lab: portal, relays, gateways and clients as real ``fz`` processes.

:class:`FzSystem` starts the pieces one by one, so the end-to-end tests can pick what each
scenario needs, and :func:`start_demo` is what ``fz lab up`` runs: everything, seeded::

    sysm = FzSystem(lab, workdir)
    sysm.start_portal()
    sysm.start_relays()                       # relay-1, relay-2 in portal mode
    sysm.admin("site", "add", "lab")
    sysm.start_gateway("gateway-1", site="lab")
    sysm.start_client("client", user="alice@acme.test", groups=["eng"])
    sysm.start_client("client-2", user="bob@acme.test", groups=["sales"])   # a second user

Admin commands run the real CLI inside the portal's namespace (the lab is unreachable from the
host's own namespace) with an isolated environment (HOME and XDG directories under ``workdir``)
that holds the admin token ``fz portal init`` stored. Every process is started with
:meth:`Lab.popen`, so it logs to the lab's log directory and ``Lab.down()`` stops it by PID, also
when the lab outlives the command that started it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from firezone.lab.lab import Lab, LabError

PORTAL_PORT = 8080
RELAY_PORT = 3478
ACCOUNT = "acme"
FZ = [sys.executable, "-m", "firezone"]
# The checkout (or site-packages) holding the firezone package: the lab's processes import it.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]

# What start_demo seeds.
DEMO_SITE = "lab"
DEMO_GROUP = "engineering"
DEMO_USERS = (("alice@acme.test", "Alice", (DEMO_GROUP,)), ("bob@acme.test", "Bob", ("sales",)))
DEMO_RESOURCES = (
    ("resource-net", "198.51.100.0/24", "the resource network (CIDR)"),
    ("dns-host", "dns.httpbin.test", "one name (DNS)"),
    ("httpbin", "**.httpbin.test", "every name under httpbin.test (wildcard)"),
)
DEMO_INTERNET = "Internet"
DEMO_HINTS = (
    "fz lab exec client -- curl http://dns.httpbin.test/",
    "fz lab exec client -- curl http://198.51.100.10/",
    "fz lab exec client -- curl http://download.httpbin.test/bytes/100",
    "fz lab exec client -- fz client status",
    "fz lab exec client-2 -- fz client status   (bob, group sales: no resources)",
    "fz lab exec client -- fz client internet on; fz lab exec client -- curl http://www.example.test/ip",
    "fz lab exec portal -- fz policy explain --user bob@acme.test --resource dns-host   (admin commands)",
    "fz lab status",
    "fz lab down",
)


class FzSystemError(LabError, AssertionError):
    """A component did not start or an admin command failed (an AssertionError for the tests)."""


def isolated_env(root: Path) -> dict[str, str]:
    """The caller's environment without FIREZONE_* settings, with every user directory under root."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIREZONE_")}
    for name in ("home", "config", "data", "state", "cache"):
        (root / name).mkdir(parents=True, exist_ok=True)
    env.update({
        "HOME": str(root / "home"),
        "XDG_CONFIG_HOME": str(root / "config"),
        "XDG_DATA_HOME": str(root / "data"),
        "XDG_STATE_HOME": str(root / "state"),
        "XDG_CACHE_HOME": str(root / "cache"),
        "FIREZONE_CREDENTIALS": "file",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        "COLUMNS": "250",
        "NO_COLOR": "1",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def control_socket_path(lab: Lab, node: str) -> Path:
    """Where the client on ``node`` listens for ``fz client status`` (``fz lab exec`` points there)."""
    return lab.state_dir / f"{node}.client.sock"


def exec_env(lab: Lab, node: str) -> dict[str, str]:
    """Environment for a command run in ``node`` by ``fz lab exec`` when the system is up there:
    in the client, ``fz client status`` finds the lab's client; in the portal, admin commands
    (``fz policy list``) use the admin token and the portal of ``fz lab up``."""
    env: dict[str, str] = {}
    sock = control_socket_path(lab, node)
    if sock.exists():
        env["FIREZONE_CONTROL_SOCKET"] = str(sock)
    admin = lab.state_dir / "system" / "admin"
    if node == "portal" and admin.is_dir():
        env.update({
            "XDG_CONFIG_HOME": str(admin / "config"),
            "XDG_DATA_HOME": str(admin / "data"),
            "XDG_STATE_HOME": str(admin / "state"),
            "FIREZONE_CREDENTIALS": "file",
            "FIREZONE_PORTAL": f"http://{lab.addr('portal', 4)}:{PORTAL_PORT}",
        })
    return env


class FzSystem:
    def __init__(self, lab: Lab, workdir: Path, *, fast_reevaluation: bool = True) -> None:
        self.lab = lab
        self.workdir = workdir
        self.env = isolated_env(workdir / "admin")
        self.env["PYTHONPATH"] = str(PACKAGE_ROOT)
        if fast_reevaluation:
            self.env["FIREZONE_PORTAL_REEVALUATE_INTERVAL"] = "1"
            self.env["FIREZONE_PORTAL_AUTHORIZATION_TIMEOUT"] = "5"
        self.data_dir = workdir / "portal-data"
        self.procs: dict[str, subprocess.Popen[Any]] = {}
        self.logs: list[Path] = []
        self._groups: set[str] = set()

    # -- portal and admin --------------------------------------------------------------------

    @property
    def portal_url(self) -> str:
        return f"http://{self.lab.addr('portal', 4)}:{PORTAL_PORT}"

    def start_portal(self) -> None:
        if not self.data_dir.exists():
            r = self.lab.exec("portal", [*FZ, "portal", "init", "--data-dir", str(self.data_dir), "--account",
                                         ACCOUNT, "--admin-email", "admin@acme.test", "--url", self.portal_url],
                              env=self.env, check=False, timeout=60)
            if r.returncode != 0:
                raise FzSystemError(f"fz portal init failed: {r.stderr}")
        self._popen("portal", "portal", [*FZ, "-v", "portal", "serve", "--data-dir", str(self.data_dir),
                                         "--listen", f"{self.lab.addr('portal', 4)}:{PORTAL_PORT}"])
        self.wait(lambda: self.lab.exec("portal", ["curl", "-sf", "-m", "2", self.portal_url + "/healthz"],
                                        check=False).returncode == 0, 30, "portal healthy", proc="portal")

    def stop(self, key: str) -> None:
        proc = self.procs.pop(key)
        if proc.poll() is None:
            self.lab.stop(proc, timeout=10)

    def admin(self, *args: str) -> Any:
        """Run ``fz --json ARGS`` against the portal as the admin; the parsed JSON output."""
        r = self.lab.exec("portal", [*FZ, "--json", "--portal", self.portal_url, *args], env=self.env,
                          check=False, timeout=60)
        if r.returncode != 0:
            raise FzSystemError(f"fz {' '.join(args)} failed ({r.returncode}): {r.stderr}")
        return json.loads(r.stdout) if r.stdout.strip() else None

    def token(self, kind: str, *args: str) -> str:
        return str(self.admin("token", "create", kind, *args)["secret"])

    # -- relays, gateways, clients -----------------------------------------------------------

    def start_relays(self, nodes: tuple[str, ...] = ("relay-1", "relay-2")) -> None:
        before = len(self.admin("relay", "list"))
        for node in nodes:
            tok = self.token("relay")
            self._popen(node, "relay", [*FZ, "-v", "--portal", self.portal_url, "relay", "run", "--token", tok,
                                        "--listen", f"{self.lab.addr(node, 4)}:{RELAY_PORT}"])
        self.wait(lambda: len(self.admin("relay", "list")) >= before + len(nodes), 30, "relays online")

    def start_gateway(self, node: str, *, site: str) -> None:
        tok = self.token("gateway", "--site", site)
        self._popen(node, "gateway", [*FZ, "-v", "--portal", self.portal_url, "gateway", "up",
                                      "--id", f"{self.lab.prefix}-{node}"],
                    env={"FIREZONE_TOKEN": tok})
        self.wait(lambda: "gateway ready" in self.log_text(node), 30, f"{node} ready", proc=node)

    def control_socket(self, node: str) -> str:
        return str(control_socket_path(self.lab, node))

    def add_user(self, user: str, groups: Sequence[str] = (), name: str | None = None) -> None:
        """Add ``user`` (unless it exists) and make it a member of ``groups`` (created as needed)."""
        if not self.admin("user", "list", "--email", user):
            self.admin("user", "add", user, *(("--name", name) if name else ()))
        for g in groups:
            if g not in self._groups:
                self.admin("group", "add", g)
                self._groups.add(g)
            self.admin("group", "add-member", g, user)

    def start_client(self, node: str = "client", *, user: str, groups: Sequence[str] = (),
                     dns_control: str = "etc-resolv-conf", expires: str = "1d", extra: Sequence[str] = ()) -> None:
        self.add_user(user, groups)
        tok = self.token("client", "--user", user, "--expires", expires)
        self._popen(node, "client", [*FZ, "-v", "--portal", self.portal_url, "client", "up", "--dns-control",
                                     dns_control, "--id", f"{self.lab.prefix}-{node}", "--account", ACCOUNT,
                                     "--control-socket", self.control_socket(node), *extra],
                    env={"FIREZONE_TOKEN": tok})
        self.wait(lambda: (self.status(node, check=False) or {}).get("interface", {}).get("ipv4") is not None,
                  30, f"{node} signed in", proc=node)

    # -- probes -----------------------------------------------------------------------------

    def status(self, node: str = "client", *, check: bool = True) -> dict[str, Any] | None:
        r = self.lab.exec(node, [*FZ, "--json", "client", "status", "--control-socket", self.control_socket(node)],
                          env=self.env, check=False, timeout=20)
        if r.returncode != 0:
            if check:
                raise FzSystemError(f"fz client status on {node} failed: {r.stderr}")
            return None
        return dict(json.loads(r.stdout))

    def curl(self, node: str, url: str, *, timeout: float = 15, extra: tuple[str, ...] = ()) -> \
            subprocess.CompletedProcess[str]:
        return self.lab.exec(node, ["curl", "-sS", "-m", str(timeout), *extra, url], check=False,
                             timeout=timeout + 10)

    def audit(self) -> list[dict[str, Any]]:
        return list(self.admin("audit", "list"))

    # -- helpers ----------------------------------------------------------------------------

    def _popen(self, node: str, role: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        proc = self.lab.popen(node, argv, env={**self.env, **(env or {})}, name=f"fz-{role}")
        self.procs[node] = proc
        self.logs.append(Path(proc.log_path))  # type: ignore[attr-defined]

    def log_path(self, key: str) -> Path:
        return Path(self.procs[key].log_path)  # type: ignore[attr-defined]

    def log_text(self, key: str) -> str:
        p = self.log_path(key)
        return p.read_text(errors="replace") if p.exists() else ""

    def log_records(self, key: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text(key).splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def wait(self, pred: Callable[[], bool], timeout: float, what: str, *, proc: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            if proc is not None and self.procs[proc].poll() is not None:
                raise FzSystemError(f"{proc} exited ({self.procs[proc].returncode}) while waiting for {what}:\n"
                                    f"{self.log_text(proc)[-4000:]}")
            time.sleep(0.2)
        raise FzSystemError(f"timed out after {timeout} s waiting for {what}\n{self.tails()}")

    def tails(self, n: int = 3000) -> str:
        parts = []
        for p in self.logs:
            text = p.read_text(errors="replace") if p.exists() else ""
            parts.append(f"--- {p.name} ---\n{text[-n:]}")
        return "\n".join(parts)

    def assert_clean_logs(self) -> None:
        """No ERROR lines and no tracebacks in any component's log."""
        bad = []
        for p in self.logs:
            text = p.read_text(errors="replace") if p.exists() else ""
            for line in text.splitlines():
                if "Traceback" in line or '"level": "ERROR"' in line or '"level": "CRITICAL"' in line:
                    bad.append(f"{p.name}: {line}")
        if bad:
            raise FzSystemError("errors in component logs:\n" + "\n".join(bad))


def start_demo(lab: Lab, progress: Callable[[str], None] = lambda _msg: None) -> FzSystem:
    """Start and seed the whole system in ``lab`` (what ``fz lab up`` does); returns when the
    client is signed in. The processes keep running until ``lab.down()``."""
    sysm = FzSystem(lab, lab.state_dir / "system", fast_reevaluation=False)
    progress("starting the portal")
    sysm.start_portal()
    progress("starting relay-1 and relay-2")
    sysm.start_relays()
    progress("seeding the account: users, groups, site, resources, policies")
    sysm.admin("site", "add", DEMO_SITE)
    for email, name, groups in DEMO_USERS:
        sysm.add_user(email, groups, name=name)
    for rname, address, description in DEMO_RESOURCES:
        sysm.admin("resource", "add", rname, "--site", DEMO_SITE, "--address", address,
                   "--description", description)
        sysm.admin("policy", "add", "--group", DEMO_GROUP, "--resource", rname)
    sysm.admin("resource", "add", DEMO_INTERNET, "--site", DEMO_SITE, "--type", "internet")
    sysm.admin("policy", "add", "--group", DEMO_GROUP, "--resource", DEMO_INTERNET)
    progress("starting gateway-1 and gateway-2")
    for node in ("gateway-1", "gateway-2"):
        sysm.start_gateway(node, site=DEMO_SITE)
    progress("starting the client, signed in as alice@acme.test")
    sysm.start_client("client", user=DEMO_USERS[0][0])
    progress("starting the second client, signed in as bob@acme.test")
    sysm.start_client("client-2", user=DEMO_USERS[1][0])
    for node in ("client", "client-2"):
        sysm.wait(lambda: bool(((sysm.status(node, check=False) or {}).get("portal") or {}).get("connected")),
                  30, f"{node} connected to the portal", proc=node)
    return sysm
