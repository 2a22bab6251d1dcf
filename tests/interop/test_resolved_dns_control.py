"""``--dns-control systemd-resolved`` against the real systemd-resolved and resolvectl (Debian 252).

resolved, its private system bus and a dnsmasq upstream run in a network namespace of this test
(see resolved_harness for how /run/dbus, /run/systemd and /etc/passwd are made private). The DNS
half of the client -- TUN with the sentinel addresses, the stub served on them,
``dns_control.apply`` -- runs there as the harness's agent; the checks ask resolved through
``resolvectl`` and its stub listener 127.0.0.53, as applications would.

Needs `bash scripts/fetch_resolved.sh` first; without it every test fails (never skips).
"""

from __future__ import annotations

import ipaddress
import json
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from firezone.lab import Lab
from firezone.lab.topology import PUBLIC_DNS4
from firezone.runtime import dns_control
from tests.e2e.fz_lab_system import ACCOUNT, FZ, FzSystem, run_system
from tests.interop import resolved_harness
from tests.interop.netns import Topology, wait_until
from tests.interop.resolved_harness import ResolvedFiles, ResolvedNode

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]

UPSTREAM = "192.0.2.53"  # dnsmasq inside the namespace: the "system" resolver from /etc/resolv.conf
TUN = "tun-firezone"
SENTINELS = ["100.100.111.1", "fd00:2021:1111:8000:100:100:111:1"]
PROXY_V4 = [f"100.96.0.{i}" for i in range(1, 5)]
HARNESS = Path(resolved_harness.__file__)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ResolvedNode]:
    files = ResolvedFiles()
    host_run_systemd = sorted(p.name for p in Path("/run/systemd").iterdir()) if Path("/run/systemd").is_dir() \
        else None
    work = tmp_path_factory.mktemp("resolved")
    with Topology("rs") as topo:
        ns = topo.netns("r")

        def popen(argv: list[str], name: str, env: dict[str, str]) -> subprocess.Popen[Any]:
            log_path = topo.log_path(f"{ns.name}-{name}")
            with open(log_path, "wb") as logf:
                p = subprocess.Popen(ns.cmd(argv), env=env, stdin=subprocess.DEVNULL, stdout=logf,
                                     stderr=subprocess.STDOUT)
            topo.procs.append(p)  # stopped by PID in Topology.close
            p.log_path = log_path  # type: ignore[attr-defined]
            return p

        # The system resolver sits across a real link, so resolved sees the node as online.
        up = topo.netns("u")
        topo.veth(ns, up, "192.0.2.2/24", f"{UPSTREAM}/24")
        conf = work / "dnsmasq.conf"
        conf.write_text("local=/zone.test/\nhost-record=www.zone.test,192.0.2.80\n")
        dnsmasq = up.popen(["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--cache-size=0",
                            f"--conf-file={conf}", f"--listen-address={UPSTREAM}", "--bind-interfaces",
                            "--pid-file=", "--log-queries", "--log-facility=-"], log_name="dnsmasq")
        n = ResolvedNode(files, work / "node", ns.cmd, popen,
                         resolv_conf=f"nameserver {UPSTREAM}\nsearch lan.example\n")
        n.start()
        assert dnsmasq.poll() is None, topo.log("dnsmasq")
        yield n
    # Nothing of the host's /run/systemd was touched (resolved wrote only into the bind mount).
    after = sorted(p.name for p in Path("/run/systemd").iterdir()) if Path("/run/systemd").is_dir() else None
    assert after == host_run_systemd


class Agent:
    """The client's DNS half inside the node (resolved_harness agent), driven over stdin/stdout."""

    def __init__(self, node: ResolvedNode, state: Path, search: str = "corp.test",
                 resources: str = "app.corp.test,**.svc.test") -> None:
        self.node = node
        self.state = state
        self.proc = subprocess.Popen(
            node.command([sys.executable, str(HARNESS), "agent", TUN, str(state), search, resources]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=node.env())
        try:
            self.applied = self.read("applied")
        except BaseException:
            self.kill()
            self.close()
            raise

    def read(self, event: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(10)
            raise AssertionError(f"agent exited ({self.proc.returncode}): {self.proc.stderr.read()}"  # type: ignore[union-attr]
                                 f"\n--- resolved ---\n{self.node.log()[-3000:]}")
        msg = json.loads(line)
        assert msg["event"] == event, msg
        return dict(msg)

    def ask(self, command: str, event: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read(event)

    def queried(self) -> list[str]:
        return [q["name"] for q in self.ask("queries", "queries")["queries"]]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # EOF: the agent restores and exits
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


@pytest.fixture()
def agent(node: ResolvedNode, tmp_path: Path) -> Iterator[Agent]:
    a = Agent(node, tmp_path / "state")
    try:
        yield a
    finally:
        a.close()
        wait_until(lambda: TUN not in node.resolvectl("status").stdout, 10, what="the TUN to be gone")


def _link_setting(node: ResolvedNode, what: str) -> list[str] | None:
    """`resolvectl dns|domain tun-firezone` as a list; None while the link does not exist."""
    p = node.resolvectl(what, TUN, check=False)
    if p.returncode != 0:
        assert "No such device" in p.stderr, p.stderr
        return None
    return p.stdout.split(":", 1)[1].split() if ":" in p.stdout else []


def link_dns(node: ResolvedNode) -> list[str] | None:
    return _link_setting(node, "dns")


def link_domains(node: ResolvedNode) -> list[str] | None:
    return _link_setting(node, "domain")


def query(node: ResolvedNode, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return node.resolvectl("query", "--cache=no", "--legend=yes", *args, check=check)


def a_records(out: str) -> list[str]:
    return re.findall(r"\bIN A (\S+)", out)


def in_proxy_range(out: str) -> bool:
    """Four A records, all proxy IPs of the stub (each resource name gets its own four)."""
    ips = a_records(out)
    return len(ips) == 4 and all(ipaddress.ip_address(ip) in dns_control.PROXY_V4 for ip in ips)


def test_resolved_runs_on_the_private_bus(node: ResolvedNode) -> None:
    assert node.resolvectl("--version").stdout.startswith(f"systemd {node.files.version.split('.')[0]} ")
    status = node.resolvectl("status").stdout
    assert "resolv.conf mode: foreign" in status
    assert re.search(rf"DNS Servers:?\s+{re.escape(UPSTREAM)}", status), status
    assert "Successfully acquired requested service name" in node.log()
    # Its resolv.conf of all upstreams is what system_upstreams(mode="systemd-resolved") reads.
    assert dns_control.read_nameservers(node.resolv_conf()) == [(UPSTREAM, 53)]
    assert "192.0.2.80" in query(node, "www.zone.test").stdout


def test_apply_sets_link_dns_and_routing_domain_and_restore_reverts(node: ResolvedNode, agent: Agent) -> None:
    assert agent.applied["interface"] == TUN
    assert agent.applied["sentinels"] == SENTINELS
    # The client found the system's resolver in resolved's own resolv.conf.
    assert agent.applied["upstreams"] == [[UPSTREAM, 53]]
    assert link_dns(node) == SENTINELS
    assert link_domains(node) == ["~.", "corp.test"]
    status = node.resolvectl("status", TUN).stdout
    # DNS only: no LLMNR or mDNS scope announcing this host over the tunnel.
    scopes = next(line for line in status.splitlines() if "Current Scopes:" in line)
    assert scopes.split(":", 1)[1].split() == ["DNS"], status
    assert "-LLMNR" in status and "-mDNS" in status, status
    assert "+DefaultRoute" in status, status
    assert list(agent.state.iterdir()), "no DNS backup while applied"
    # resolved now lists the sentinels among all upstreams; the client must not take them as its own.
    text = node.resolv_conf()
    assert "nameserver 100.100.111.1" in text and "corp.test" in text
    assert dns_control.read_nameservers(text) == [(UPSTREAM, 53)]

    agent.ask("restore", "restored")
    assert link_dns(node) == []
    assert link_domains(node) == []
    assert "DefaultRoute" not in node.resolvectl("status", TUN).stdout.replace("-DefaultRoute", "")
    assert "100.100.111.1" not in node.resolv_conf()
    assert not list(agent.state.iterdir())
    agent.ask("restore", "restored")  # idempotent


def test_every_name_goes_through_the_tunnel_stub_while_applied(node: ResolvedNode, agent: Agent) -> None:
    out = query(node, "app.corp.test").stdout
    assert all(ip in out for ip in PROXY_V4), out
    assert f"link: {TUN}" in out
    # `~.`: names outside every search domain also take the TUN link, and the stub forwards them.
    out = query(node, "www.zone.test").stdout
    assert "192.0.2.80" in out and f"link: {TUN}" in out, out
    assert "www.zone.test." in agent.queried()
    out = query(node, "-t", "A", "x.y.svc.test").stdout
    assert in_proxy_range(out), out
    # Single-label names get the search domain from the link.
    out = query(node, "app").stdout
    assert "(app.corp.test)" in out and sorted(re.findall(r"\b100\.\d+\.\d+\.\d+\b", out)) == PROXY_V4, out
    # Applications that use resolved's stub listener (stub-resolv.conf) get the same.
    dig = node.run(["dig", "@127.0.0.53", "+time=3", "+tries=1", "+short", "app.corp.test", "A"]).stdout
    assert sorted(dig.split()) == PROXY_V4

    agent.ask("restore", "restored")
    before = len(agent.queried())
    out = query(node, "www.zone.test").stdout
    assert "192.0.2.80" in out and f"link: {TUN}" not in out, out
    assert not a_records(query(node, "-t", "A", "app.corp.test", check=False).stdout)
    assert len(agent.queried()) == before, "a query still reached the stub after revert"


def test_a_killed_client_leaves_a_backup_that_recover_stale_clears(node: ResolvedNode, tmp_path: Path) -> None:
    state = tmp_path / "state"
    a = Agent(node, state)
    try:
        assert link_dns(node) == SENTINELS
        a.kill()  # no restore: the backup stays behind, the TUN (and resolved's link) goes
        assert list(state.iterdir())
        wait_until(lambda: TUN not in node.resolvectl("status").stdout, 10, what="resolved to drop the link")
        # The next start (here: a bare recover_stale in the same namespace) clears the backup; the
        # revert of a link that no longer exists is not an error.
        code = f"from firezone.runtime import dns_control; from pathlib import Path\n" \
               f"print(dns_control.recover_stale(state_dir=Path({str(state)!r})))"
        assert node.run([sys.executable, "-c", code]).stdout.strip() == "True"
        assert not list(state.iterdir())
    finally:
        a.close()
    # A fresh client on a new TUN of the same name applies cleanly.
    b = Agent(node, state)
    try:
        assert link_dns(node) == SENTINELS and link_domains(node) == ["~.", "corp.test"]
    finally:
        b.close()
    wait_until(lambda: TUN not in node.resolvectl("status").stdout, 10, what="the TUN to be gone")
    assert not list(state.iterdir())


def test_resolvectl_errors_surface_and_leave_no_backup(node: ResolvedNode, tmp_path: Path) -> None:
    state = tmp_path / "state"
    code = textwrap.dedent(f"""\
        from pathlib import Path
        from firezone.runtime import dns_control
        try:
            dns_control.apply("systemd-resolved", ["100.100.111.1"], None, interface="fzt-nosuch0",
                              state_dir=Path({str(state)!r}))
        except RuntimeError as e:
            print(e)
        """)
    out = node.run([sys.executable, "-c", code]).stdout
    assert "resolvectl dns fzt-nosuch0 100.100.111.1 failed" in out, out
    assert "fzt-nosuch0" in out.split("failed:", 1)[1], out  # resolvectl's own message follows
    assert not list(state.iterdir())


# --- fz client up in the lab ------------------------------------------------------------------------

# What resolved's stub-resolv.conf says: applications ask the stub listener.
STUB_RESOLV_CONF = "nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch .\n"
LAB_USER, LAB_GROUP, LAB_SITE = "alice@acme.test", "engineering", "lab"


@pytest.fixture()
def lab_system(tmp_path: Path) -> Iterator[FzSystem]:
    ResolvedFiles()  # fail before building a lab for nothing
    lab = Lab.up()
    try:
        yield from run_system(lab, tmp_path / "system")
    finally:
        lab.down()  # stops dbus-daemon and resolved too: they were started with lab.popen


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_fz_client_up_with_systemd_resolved_in_the_lab(lab_system: FzSystem, tmp_path: Path) -> None:
    """The client host runs resolved with /etc/resolv.conf on its stub, as Debian's package sets it up."""
    fz, lab = lab_system, lab_system.lab
    node = ResolvedNode(ResolvedFiles(), tmp_path / "resolved", lambda argv: lab.command("client", argv),
                        lambda argv, name, env: lab.popen("client", argv, env=env, name=name),
                        resolv_conf=STUB_RESOLV_CONF)
    node.start()
    # The uplink's DNS server, configured per link as a network manager would.
    node.resolvectl("dns", "eth0", PUBLIC_DNS4)
    portal_ip = lab.addr("portal", 4)

    def dig(name: str) -> list[str]:
        p = node.run(["dig", "+short", "+time=3", "+tries=2", name, "A"], check=False)
        return p.stdout.split()

    assert dig("portal.example.test") == [portal_ip]

    fz.start_portal()
    fz.start_relays()
    fz.admin("site", "add", LAB_SITE)
    fz.start_gateway("gateway-1", site=LAB_SITE)
    fz.add_user(LAB_USER, [LAB_GROUP])
    fz.admin("resource", "add", "dns-host", "--site", LAB_SITE, "--address", "dns.httpbin.test")
    fz.admin("policy", "add", "--group", LAB_GROUP, "--resource", "dns-host")
    fz.admin("account", "set", "--search-domain", "httpbin.test")
    tok = fz.token("client", "--user", LAB_USER, "--expires", "1d")
    proc = lab.popen("client", node.wrap(
        [*FZ, "-v", "--portal", fz.portal_url, "client", "up", "--dns-control", "systemd-resolved",
         "--id", f"{lab.prefix}-client", "--account", ACCOUNT, "--control-socket", fz.control_socket("client")]),
        env=node.env({**fz.env, "FIREZONE_TOKEN": tok}), name="fz-client")
    fz.procs["client"] = proc
    fz.logs.append(Path(proc.log_path))  # type: ignore[attr-defined]
    fz.wait(lambda: link_dns(node) == SENTINELS, 30, "the client's sentinels on tun-firezone", proc="client")
    assert link_domains(node) == ["~.", "httpbin.test"]
    assert "+DefaultRoute" in node.resolvectl("status", TUN).stdout

    # Resource names: the client's stub answers with proxy IPs, reached through resolved.
    addrs = dig("dns.httpbin.test")
    assert addrs and all(ipaddress.ip_address(a) in dns_control.PROXY_V4 for a in addrs), addrs
    out = query(node, "dns").stdout  # the portal's search domain, applied by resolved
    assert "(dns.httpbin.test)" in out and f"link: {TUN}" in out, out
    # Other names take the tunnel link too (`~.`) and the stub forwards them to the uplink's server.
    out = query(node, "portal.example.test").stdout
    assert portal_ip in out and f"link: {TUN}" in out, out
    # And an application's connection goes through the tunnel to the resource.
    r = node.run(["curl", "-sS", "-m", "15", "http://dns.httpbin.test/"], check=False)
    assert (r.returncode, r.stdout.strip()) == (0, "dns-host"), f"{r.stderr}\n{fz.tails()}"

    fz.stop("client")  # SIGTERM: the client reverts the link and removes its TUN
    wait_until(lambda: TUN not in node.resolvectl("status").stdout, 10, what="tun-firezone to be gone")
    # The revert came from the client (resolvectl), not only from the TUN going away.
    assert re.search(r"D-Bus revert request from client PID \d+ \(resolvectl\)", node.log()), node.log()[-2000:]
    assert "100.100.111.1" not in node.resolv_conf()
    out = query(node, "portal.example.test").stdout
    assert portal_ip in out and "link: eth0" in out, out
    records = [json.loads(line) for line in Path(proc.log_path).read_text().splitlines()  # type: ignore[attr-defined]
               if line.startswith("{")]
    assert any(r.get("msg") == "DNS points at the tunnel" and r.get("mode") == "systemd-resolved"
               for r in records), records[-20:]
    fz.assert_clean_logs()
