"""The whole fz system in a lab: portal, relays, gateways and clients as real `fz` processes.

``FzSystem(lab, workdir)`` starts the pieces one by one so every scenario of ACCEPTANCE.md can pick
what it needs (one relay for single-relay, two gateways for gateway-failover, two clients for
users-and-groups, restarts for portal-/relay-restart)::

    sysm = FzSystem(lab, tmp_path)
    sysm.start_portal()
    sysm.start_relays()                       # relay-1, relay-2 in portal mode
    site = sysm.admin("site", "add", "lab")
    sysm.start_gateway("gateway-1", site="lab")
    sysm.start_client("client", user="alice@acme.test", groups=["eng"])
    sysm.admin("resource", "add", "web", "--site", "lab", "--address", "198.51.100.0/24")
    sysm.admin("policy", "add", "--group", "eng", "--resource", "web")
    sysm.curl("client", "http://198.51.100.10/")
    sysm.status("client")                     # fz client status --json

Admin commands run the real CLI inside the portal's namespace (the lab is unreachable from the
test's own namespace) with an isolated environment that holds the admin token `fz portal init`
stored. Every process logs JSON lines to the lab's log directory; :meth:`assert_clean_logs` fails
on ERROR lines and tracebacks in any of them. ``run_system`` is the body of a fixture that tears
everything down with the lab (the lab stops every process it started).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from firezone.lab import Lab
from tests.cli.conftest import isolated_env

PORTAL_PORT = 8080
RELAY_PORT = 3478
ACCOUNT = "acme"
FZ = [sys.executable, "-m", "firezone"]
REPO = Path(__file__).resolve().parents[2]


class FzSystem:
    def __init__(self, lab: Lab, workdir: Path) -> None:
        self.lab = lab
        self.workdir = workdir
        self.env = isolated_env(workdir / "admin")
        self.env["PYTHONPATH"] = str(REPO)
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
            assert r.returncode == 0, r.stderr
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
        assert r.returncode == 0, f"fz {' '.join(args)} failed ({r.returncode}): {r.stderr}"
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
        return str(self.lab.state_dir / f"{node}.client.sock")

    def start_client(self, node: str = "client", *, user: str, groups: tuple[str, ...] = (),
                     dns_control: str = "etc-resolv-conf", expires: str = "1d") -> None:
        users = self.admin("user", "list", "--email", user)
        if not users:
            self.admin("user", "add", user)
        for g in groups:
            if g not in self._groups:
                self.admin("group", "add", g)
                self._groups.add(g)
            self.admin("group", "add-member", g, user)
        tok = self.token("client", "--user", user, "--expires", expires)
        self._popen(node, "client", [*FZ, "-v", "--portal", self.portal_url, "client", "up", "--dns-control",
                                     dns_control, "--id", f"{self.lab.prefix}-{node}", "--account", ACCOUNT, "--control-socket",
                                     self.control_socket(node)],
                    env={"FIREZONE_TOKEN": tok})
        self.wait(lambda: (self.status(node, check=False) or {}).get("interface", {}).get("ipv4") is not None,
                  30, f"{node} signed in", proc=node)

    # -- probes -----------------------------------------------------------------------------

    def status(self, node: str = "client", *, check: bool = True) -> dict[str, Any] | None:
        r = self.lab.exec(node, [*FZ, "--json", "client", "status", "--control-socket", self.control_socket(node)],
                          env=self.env, check=False, timeout=20)
        if r.returncode != 0:
            assert not check, r.stderr
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
        key = node
        proc = self.lab.popen(node, argv, env={**self.env, **(env or {})}, name=f"fz-{role}")
        self.procs[key] = proc
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
                raise AssertionError(f"{proc} exited ({self.procs[proc].returncode}) while waiting for {what}:\n"
                                     f"{self.log_text(proc)[-4000:]}")
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{self.tails()}")

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
        assert not bad, "errors in component logs:\n" + "\n".join(bad)


def run_system(lab: Lab, workdir: Path) -> Iterator[FzSystem]:
    """Fixture body: an FzSystem on ``lab``; its logs are copied to ``workdir/logs`` afterwards.

    Use it as ``@pytest.fixture def fz(lab, tmp_path): yield from run_system(lab, tmp_path)``.
    """
    sysm = FzSystem(lab, workdir)
    try:
        yield sysm
    finally:
        for key in list(sysm.procs):
            try:
                sysm.stop(key)
            except Exception as e:  # noqa: BLE001 - the lab's teardown stops what is left
                print(f"stopping {key} failed: {e}", file=sys.stderr)
        keep = workdir / "logs"
        keep.mkdir(exist_ok=True)
        for p in sysm.logs:
            if p.exists():
                shutil.copy(p, keep / p.name)
