"""The network-namespace lab: topology, reachability, DNS, services, NAT modes, loss, teardown."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from firezone.lab import Lab, LabError, LabExecError, check_prerequisites
from firezone.lab import topology as topo
from firezone.lab.httpd import payload, payload_sha256
from tests.e2e.conftest import wait_for_line

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

PY = sys.executable
FZ = str(Path(sys.executable).with_name("fz"))
PROBE = [PY, "-m", "firezone.lab.udpprobe"]


def netns_list() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def lab_namespaces(prefix: str) -> list[str]:
    return [ns for ns in netns_list() if ns.startswith(prefix + "-")]


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def reaches(lab: Lab, node: str, target: str) -> bool:
    return lab.exec(node, ["ping", "-c1", "-W1", target], check=False).returncode == 0


def echo_server(lab: Lab, node: str, port: int) -> subprocess.Popen[str]:
    p = lab.popen(node, [*PROBE, "echo", "--port", str(port)], stdout=subprocess.PIPE,
                  stderr=subprocess.DEVNULL, name=f"echo{port}")
    wait_for_line(p, "ready")
    return p


def probe(lab: Lab, node: str, targets: list[str], check: bool = True,
          bind_port: int = 0) -> dict[str, Any]:
    args = [*PROBE, "probe", "--timeout", "0.5", "--tries", "2", "--bind-port", str(bind_port)]
    for t in targets:
        args += ["--to", t]
    r = lab.exec(node, args, check=check)
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def hostport(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


# -- bring-up -------------------------------------------------------------------------------------


def test_lab_comes_up_with_every_namespace_recorded(lab: Lab) -> None:
    expected = {f"{lab.prefix}-{s}" for s in topo.NAMESPACES}
    assert set(lab_namespaces(lab.prefix)) == expected
    state = json.loads((lab.state_dir / "state.json").read_text())
    assert set(state["namespaces"]) == expected
    assert state["owner"]["pid"] == os.getpid()
    assert {p["name"] for p in state["processes"]} == {"dnsmasq", "httpd", "iperf3"}
    assert all(p["alive"] for p in lab.processes())
    # Each node resolves through the right server: public DNS outside, private DNS for gateways.
    for node, server in (("client", topo.PUBLIC_DNS4), ("relay-1", topo.PUBLIC_DNS4),
                         ("portal", topo.PUBLIC_DNS4), ("gateway-1", topo.PRIVATE_DNS4),
                         ("gateway-2", topo.PRIVATE_DNS4)):
        conf = Path("/etc/netns") / lab.ns(node) / "resolv.conf"
        assert conf.read_text() == f"nameserver {server}\n"
        assert lab.exec(node, ["cat", "/etc/resolv.conf"]).stdout == f"nameserver {server}\n"


def test_nothing_of_the_lab_in_the_root_namespace(lab: Lab) -> None:
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert f"link-netns {lab.prefix}-" not in links
    for node in lab.nodes():
        assert lab.ns(node) in netns_list()


def test_node_addresses_and_namespaces(lab: Lab) -> None:
    assert lab.addr("portal") == "203.0.113.10"
    assert lab.addr("relay-2", 6) == "2001:db8:113::102"
    assert lab.addr("client-router") == "203.0.113.20"
    assert lab.addr("client-router", net="lan") == "192.0.2.1"
    assert lab.addr("gateway-2", net="res") == "198.51.100.131"
    assert lab.addr("download", 6) == "2001:db8:51::21"
    assert lab.ns("http") == lab.ns("private-dns") == f"{lab.prefix}-res"
    got = lab.exec("client", ["ip", "-o", "addr", "show", "dev", "eth0"]).stdout
    assert "192.0.2.10/25" in got and "2001:db8:2::10/64" in got
    with pytest.raises(LabError, match="unknown lab node"):
        lab.ns("nope")
    with pytest.raises(LabExecError, match="client: false exited with 1"):
        lab.exec("client", ["false"])


# -- reachability -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
def test_reachability_as_designed(lab: Lab, family: int) -> None:
    # Client and gateways reach every internet host through their routers.
    for src in ("client", "gateway-1", "gateway-2"):
        for dst in ("portal", "relay-1", "relay-2", "public-dns", "client-router", "gateway-router"):
            assert reaches(lab, src, lab.addr(dst, family)), f"{src} -> {dst}"
    # Gateways reach the resource net, directly.
    for gw in ("gateway-1", "gateway-2"):
        for res in ("http", "dns-host", "download", "iperf3", "private-dns"):
            assert reaches(lab, gw, lab.addr(res, family)), f"{gw} -> {res}"
    # The resource net is not reachable from the client side or the internet.
    for src in ("client", "client-router", "portal", "relay-1", "gateway-router"):
        for res in ("http", "private-dns"):
            assert not reaches(lab, src, lab.addr(res, family)), f"{src} -> {res}"
    url = f"http://{hostport(lab.addr('http', family), 80)}/"
    r = lab.exec("client", ["curl", "-sS", "--max-time", "3", url], check=False)
    assert r.returncode != 0 and r.stdout == ""
    # Private site addresses are not reachable from the internet or across sites.
    for src, dst in (("portal", "client"), ("portal", "gateway-1"), ("client", "gateway-1"),
                     ("gateway-1", "client")):
        assert not reaches(lab, src, lab.addr(dst, family)), f"{src} -> {dst}"


def test_client_traffic_leaves_through_its_routers_nat(lab: Lab) -> None:
    echo_server(lab, "portal", 40000)
    for node, router in (("client", "client-router"), ("gateway-1", "gateway-router")):
        for family in (4, 6):
            seen = probe(lab, node, [hostport(lab.addr("portal", family), 40000)])["seen"]
            (ip_port,) = seen.values()
            assert ip_port.split()[0] == lab.addr(router, family)


# -- services ---------------------------------------------------------------------------------------


def test_public_and_private_dns(lab: Lab) -> None:
    def dig(node: str, *args: str) -> list[str]:
        return lab.exec(node, ["dig", "+short", "+time=1", "+tries=2", *args]).stdout.split()

    assert dig("client", "portal.example.test") == ["203.0.113.10"]
    assert dig("client", "AAAA", "relay-2.example.test") == ["2001:db8:113::102"]
    assert dig("relay-1", "relay-1.example.test") == ["203.0.113.101"]
    assert dig("gateway-1", "download.httpbin.test") == ["198.51.100.21"]
    assert dig("gateway-1", "alias.httpbin.test") == ["198.51.100.21"]
    assert dig("gateway-2", "dns.httpbin.test") == ["198.51.100.20"]
    assert dig("gateway-2", "AAAA", "deep.sub.httpbin.test") == ["2001:db8:51::20"]
    assert dig("gateway-2", "httpbin.test") == ["198.51.100.10"]
    assert dig("gateway-1", "portal.example.test") == ["203.0.113.10"]
    # The private zone is unknown outside: the public server does not answer for it.
    assert dig("client", "download.httpbin.test") == []
    # Unknown names inside a zone are NXDOMAIN, not forwarded anywhere.
    r = lab.exec("client", ["dig", "+time=1", "nope.example.test"])
    assert "status: NXDOMAIN" in r.stdout
    # big.<zone> does not fit a 512-byte UDP answer: truncated over UDP, complete over TCP.
    r = lab.exec("client", ["dig", "+noedns", "+ignore", "big.example.test"])
    assert " tc" in r.stdout.split("flags:")[1].split(";")[0]
    full = lab.exec("client", ["dig", "+tcp", "+short", "big.example.test"]).stdout.split()
    assert len(full) == topo.BIG_RECORD_COUNT
    log = (lab.state_dir / "logs" / "public-dns.queries.log").read_text()
    assert "portal.example.test" in log


@pytest.mark.parametrize("family", [4, 6])
def test_http_server_names_and_downloads(lab: Lab, family: int) -> None:
    def url(node: str, path: str, port: int = 80) -> str:
        a = lab.addr(node, family)
        return f"http://{'[' + a + ']' if family == 6 else a}:{port}{path}"

    for node in ("http", "dns-host", "download"):
        for port in (80, 8080):
            out = lab.exec("gateway-1", ["curl", "-sSf", "--max-time", "5", url(node, "/", port)]).stdout
            assert out == f"{node}\n"
    assert lab.exec("gateway-2", ["curl", "-sSf", url("http", "/ip")]).stdout == \
        f"{lab.addr('gateway-2', family, net='res')}\n"
    n = 3 * 1024 * 1024 + 7
    cmd = f"curl -sSf -D /dev/stderr {url('download', f'/bytes/{n}')} | sha256sum"
    r = lab.exec("gateway-1", ["sh", "-c", cmd])
    digest = r.stdout.split()[0]
    assert digest == payload_sha256(n) == hashlib.sha256(payload(n)).hexdigest()
    assert f"x-sha256: {digest}" in r.stderr.lower()
    assert payload(100) == payload(200)[:100]


def test_iperf3_server_runs(lab: Lab) -> None:
    r = lab.exec("gateway-1", ["iperf3", "-c", lab.addr("iperf3"), "-t", "1", "-J"], timeout=20)
    result = json.loads(r.stdout)
    assert result["end"]["sum_received"]["bytes"] > 0


# -- NAT modes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("side", ["client", "gateway-1"])
def test_easy_nat_maps_endpoint_independently(lab: Lab, side: str, family: int) -> None:
    echo_server(lab, "portal", 40000)
    echo_server(lab, "relay-1", 40000)
    router = "client-router" if side == "client" else "gateway-router"
    seen = probe(lab, side, [hostport(lab.addr("portal", family), 40000),
                             hostport(lab.addr("relay-1", family), 40000)])["seen"]
    mappings = set(seen.values())
    assert len(mappings) == 1, seen
    assert mappings.pop().split()[0] == lab.addr(router, family)


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("side", ["client", "gateway-1"])
def test_symmetric_nat_maps_per_destination(lab: Lab, side: str, family: int) -> None:
    router = "client-router" if side == "client" else "gateway-router"
    lab.set_nat(router, "symmetric")
    assert lab.nat[router] == "symmetric"
    echo_server(lab, "portal", 40000)
    echo_server(lab, "relay-1", 40000)
    seen = probe(lab, side, [hostport(lab.addr("portal", family), 40000),
                             hostport(lab.addr("relay-1", family), 40000)])["seen"]
    ips = {v.split()[0] for v in seen.values()}
    ports = {v.split()[1] for v in seen.values()}
    assert ips == {lab.addr(router, family)}
    assert len(ports) == 2, seen


def test_nat_change_reaches_existing_flows_after_a_conntrack_flush(lab: Lab) -> None:
    echo_server(lab, "portal", 40000)
    target = ["203.0.113.10:40000"]
    # Easy NAT keeps the source port when it is free.
    assert probe(lab, "client", target, bind_port=41000)["seen"] == {target[0]: "203.0.113.20 41000"}
    lab.set_nat("client-router", "symmetric")
    # The flow's conntrack entry (and so its mapping) survives the ruleset change ...
    assert probe(lab, "client", target, bind_port=41000)["seen"] == {target[0]: "203.0.113.20 41000"}
    lab.flush_conntrack("client-router")
    # ... until it is flushed: the same flow then gets a random port.
    (after,) = probe(lab, "client", target, bind_port=41000)["seen"].values()
    assert after.split()[0] == "203.0.113.20" and after.split()[1] != "41000"


@pytest.mark.parametrize("lab", [{"nat": "symmetric"}], indirect=True)
def test_symmetric_nat_from_up(lab: Lab) -> None:
    assert lab.nat == {"client-router": "symmetric", "gateway-router": "symmetric"}
    echo_server(lab, "portal", 40000)
    echo_server(lab, "relay-2", 40000)
    seen = probe(lab, "client", ["203.0.113.10:40000", "203.0.113.102:40000"])["seen"]
    assert len(set(seen.values())) == 2, seen


def test_nat_drops_unsolicited_inbound(lab: Lab) -> None:
    echo_server(lab, "client", 40001)
    r = probe(lab, "portal", [f"{lab.addr('client-router')}:40001"], check=False)
    assert r["seen"] == {}


def hole_punch(lab: Lab, family: int = 4, duration: float = 1.5) -> tuple[int, int]:
    """Client and gateway-1 punch towards each other's router on port 52625; datagrams received."""
    crtr, grtr = lab.addr("client-router", family), lab.addr("gateway-router", family)
    gw = lab.popen("gateway-1", [*PROBE, "punch", "--bind-port", "52625", "--duration", str(duration),
                                 "--peer", hostport(crtr, 52625)],
                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, name="punch")
    wait_for_line(gw, "ready")
    client = lab.exec("client", [*PROBE, "punch", "--bind-port", "52625", "--duration", str(duration),
                                 "--peer", hostport(grtr, 52625)])
    out, _ = gw.communicate(timeout=30)
    c, g = json.loads(client.stdout.splitlines()[-1]), json.loads(out.splitlines()[-1])
    # Whatever arrived came from the other router's public address and the predicted port.
    assert set(c["from"]) <= {f"{grtr} 52625"} and set(g["from"]) <= {f"{crtr} 52625"}, (c, g)
    return int(c["received"]), int(g["received"])


@pytest.mark.parametrize("family", [4, 6])
def test_hole_punching_works_through_easy_nat(lab: Lab, family: int) -> None:
    c, g = hole_punch(lab, family)
    assert c > 0 and g > 0


@pytest.mark.parametrize("lab", [{"nat": "symmetric"}], indirect=True)
def test_hole_punching_fails_through_symmetric_nat(lab: Lab) -> None:
    assert hole_punch(lab) == (0, 0)


@pytest.mark.parametrize("lab", [{"nat": "blocked"}], indirect=True)
def test_udp_between_sites_blocked_and_unblocked(lab: Lab) -> None:
    assert lab.udp_blocked
    assert hole_punch(lab, 4) == (0, 0)
    assert hole_punch(lab, 6) == (0, 0)
    rules = lab.exec("gateway-router", ["nft", "list", "table", "inet", "fzlab"]).stdout
    assert 'ip daddr 203.0.113.20 meta l4proto udp' in rules
    # UDP to the internet and ICMP across the sites still work.
    echo_server(lab, "portal", 40000)
    assert len(probe(lab, "client", ["203.0.113.10:40000"])["seen"]) == 1
    assert len(probe(lab, "gateway-2", ["[2001:db8:113::10]:40000"])["seen"]) == 1
    assert reaches(lab, "client", lab.addr("gateway-router"))
    lab.block_udp_between_sites(False)
    assert not lab.udp_blocked
    c, g = hole_punch(lab)
    assert c > 0 and g > 0


# -- loss -------------------------------------------------------------------------------------------


def count_delivered(lab: Lab, n: int, port: int) -> int:
    counter = lab.popen("portal", [*PROBE, "count", "--port", str(port), "--idle", "1"],
                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, name="count")
    wait_for_line(counter, "ready")
    lab.exec("client", [*PROBE, "blast", "--to", f"203.0.113.10:{port}", "--count", str(n)])
    out, _ = counter.communicate(timeout=30)
    return int(json.loads(out.strip().splitlines()[-1])["received"])


def test_loss_rule_drops_about_the_configured_share(lab: Lab) -> None:
    n = 2000
    assert count_delivered(lab, n, 40010) >= n * 0.99
    lab.set_loss("client-router", 30)
    assert lab.loss["client-router"] == 30
    got = count_delivered(lab, n, 40011) / n
    # 2000 Bernoulli(0.7) trials: standard deviation ~1 %, so +-5 % is far outside chance.
    assert 0.65 <= got <= 0.75, got
    rules = lab.exec("client-router", ["nft", "list", "table", "inet", "fzlab"]).stdout
    assert "numgen random mod 10000 < 3000" in rules
    lab.set_loss("client-router", 0)
    assert count_delivered(lab, n, 40012) >= n * 0.99


@pytest.mark.parametrize("lab", [{"loss": 20}], indirect=True)
def test_loss_from_up_applies_to_the_client_router(lab: Lab) -> None:
    assert lab.loss == {"client-router": 20.0, "gateway-router": 0.0}
    got = count_delivered(lab, 2000, 40013) / 2000
    assert 0.75 <= got <= 0.85, got


# -- teardown ---------------------------------------------------------------------------------------


def test_down_leaves_nothing(lab_factory: Any) -> None:
    lab = lab_factory()
    extra = lab.popen("client", ["sh", "-c", "sleep 300 & sleep 300 & echo ready; wait"],
                      stdout=subprocess.PIPE, name="sleeper")
    wait_for_line(extra, "ready")
    pids = [p["pid"] for p in lab.processes()]
    assert len(pids) == 6 and all(pid_alive(p) for p in pids)  # 2 dnsmasq, 2 httpd, iperf3, the sleeper
    group = subprocess.run(["pgrep", "-g", str(extra.pid)], capture_output=True,
                           text=True, check=False).stdout.split()
    assert len(group) == 3  # sh and its two sleeps
    lab.down()
    assert lab_namespaces(lab.prefix) == []
    assert not any(Path("/etc/netns", f"{lab.prefix}-{s}").exists() for s in topo.NAMESPACES)
    assert not lab.state_dir.exists()
    assert not any(pid_alive(p) for p in pids + [int(g) for g in group])
    lab.down()  # idempotent


def test_down_after_crash_removes_everything(_lab_janitor: None) -> None:
    prefix = "fzc" + secrets.token_hex(3)
    script = textwrap.dedent(f"""
        import os, signal
        from firezone.lab import Lab
        lab = Lab.up(prefix={prefix!r})
        lab.popen("relay-1", ["sleep", "300"])
        print(",".join(str(p["pid"]) for p in lab.processes()), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    r = subprocess.run([PY, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == -signal.SIGKILL, r.stderr
    pids = [int(p) for p in r.stdout.strip().split(",")]
    assert len(pids) == 6 and all(pid_alive(p) for p in pids)  # 2 dnsmasq, 2 httpd, iperf3, the sleeper
    assert len(lab_namespaces(prefix)) == len(topo.NAMESPACES)
    try:
        assert Lab.load(prefix).stale
        assert prefix in Lab.down_all(stale_only=True)
    finally:
        if Path("/run/fz-lab", prefix).exists():
            Lab.load(prefix).down()
    assert lab_namespaces(prefix) == []
    assert not Path("/run/fz-lab", prefix).exists()
    assert not any(Path("/etc/netns", f"{prefix}-{s}").exists() for s in topo.NAMESPACES)
    assert not any(pid_alive(p) for p in pids)


def test_down_all_removes_namespaces_no_state_file_mentions(lab: Lab, tmp_path: Path) -> None:
    orphan = "fzo" + secrets.token_hex(3)
    subprocess.run(["ip", "netns", "add", f"{orphan}-client"], check=True)
    Path("/etc/netns", f"{orphan}-gw1").mkdir(parents=True)
    try:
        # A separate state root: labs recorded under the default root (like `lab`) are kept.
        assert Lab.down_all(state_root=tmp_path) == [orphan]
        assert lab_namespaces(orphan) == []
        assert not Path("/etc/netns", f"{orphan}-gw1").exists()
        assert len(lab_namespaces(lab.prefix)) == len(topo.NAMESPACES)
    finally:
        subprocess.run(["ip", "netns", "del", f"{orphan}-client"], capture_output=True, check=False)
        shutil.rmtree(Path("/etc/netns", f"{orphan}-gw1"), ignore_errors=True)


def test_stale_cleanup_spares_live_labs(lab: Lab) -> None:
    assert not lab.stale
    assert lab.prefix not in Lab.down_all(stale_only=True)
    assert len(lab_namespaces(lab.prefix)) == len(topo.NAMESPACES)


# -- CLI --------------------------------------------------------------------------------------------


def fz(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FZ, *args], capture_output=True, text=True, timeout=timeout, check=False)


def test_cli_up_status_exec_down(_lab_janitor: None) -> None:
    prefix = "fzc" + secrets.token_hex(3)
    try:
        r = fz("--json", "lab", "up", "--bare", "--prefix", prefix, "--nat", "symmetric", "--loss", "5")
        assert r.returncode == 0, r.stderr
        up = json.loads(r.stdout)
        assert up["prefix"] == prefix and up["persistent"] is True
        assert up["nat"]["client-router"] == "symmetric" and up["loss"]["client-router"] == 5
        r = fz("--json", "lab", "status", "--prefix", prefix)
        (st,) = json.loads(r.stdout)
        assert all(st["namespaces"].values()) and all(p["alive"] for p in st["processes"])
        assert not st["stale"]
        r = fz("lab", "exec", "--prefix", prefix, "client", "--", "ip", "-4", "-o", "addr", "show", "eth0")
        assert r.returncode == 0 and "192.0.2.10/25" in r.stdout
        r = fz("lab", "exec", "--prefix", prefix, "gateway-1", "--", "sh", "-c", "exit 7")
        assert r.returncode == 7
        r = fz("lab", "exec", "--prefix", prefix, "nowhere", "--", "true")
        assert r.returncode == 2 and "nowhere" in r.stderr
        r = fz("lab", "status")
        assert r.returncode == 0 and prefix in r.stdout
        r = fz("--json", "lab", "down", "--prefix", prefix)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == {"removed": [prefix]}
    finally:
        if Path("/run/fz-lab", prefix).exists():
            Lab.load(prefix).down()
    assert lab_namespaces(prefix) == []
    r = fz("lab", "down", "--prefix", prefix)
    assert r.returncode == 1 and r.stderr.startswith("fz: error: no lab with prefix")


def test_cli_says_plainly_when_not_root() -> None:
    env = {"PATH": os.environ["PATH"], "HOME": "/nonexistent"}
    for args in (["lab", "up"], ["lab", "status"], ["lab", "down"], ["lab", "exec", "client", "--", "true"]):
        # As nobody, but able to read the checkout wherever it lives (e.g. under a 0700 home):
        # the check under test is on the effective user id, not on file access.
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", FZ, *args],
                           capture_output=True, text=True, env=env, timeout=30, check=False)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert "needs root" in r.stderr and "Traceback" not in r.stderr


def test_missing_tool_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for tool in ("ip", "ss", "bridge", "nft", "sysctl", "iperf3"):
        os.symlink(shutil.which(tool), tmp_path / tool)  # type: ignore[arg-type]
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(LabError, match=r"missing system tool: dnsmasq \(Debian package dnsmasq-base\)"):
        check_prerequisites()
    with pytest.raises(LabError, match="dnsmasq"):
        Lab.up()
    r = subprocess.run([FZ, "lab", "up"], capture_output=True, text=True, timeout=30, check=False,
                       env={**os.environ, "PATH": str(tmp_path)})
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == \
        "fz: error: missing system tool: dnsmasq (Debian package dnsmasq-base)"
