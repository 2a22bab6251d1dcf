"""ACCEPTANCE "users-and-groups": two clients, two users; only the allowed group gets through.

alice (group engineering) runs on ``client``, bob (group sales) on ``client-2``; both sit behind
the same client-site NAT. The resources have a policy for engineering only. A counting nftables
table in gateway-1's forward hook shows what the gateway forwarded from each tunnel address, so
"the gateway never forwards anything from bob" is measured in the kernel, not inferred from
curl failing.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from firezone.lab import Lab
from tests.e2e.fz_lab_system import FzSystem, run_system

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

SITE = "lab"
ALICE = "alice@acme.test"
BOB = "bob@acme.test"
ENGINEERING = "engineering"
SALES = "sales"
HTTP = "http://198.51.100.10/"
DNS_URL = "http://dns.httpbin.test/"
RESOURCES = {"resource-net", "dns-host"}


@pytest.fixture
def fz(lab: Lab, tmp_path: Path) -> Iterator[FzSystem]:
    yield from run_system(lab, tmp_path)


# -- helpers ----------------------------------------------------------------------------------


def _resources(fz: FzSystem, node: str) -> set[str]:
    st = fz.status(node, check=False) or {}
    return {r["name"] for r in st.get("resources") or []}


def _dig(fz: FzSystem, node: str, name: str) -> list[str]:
    r = fz.lab.exec(node, ["dig", "+short", "+time=2", "+tries=1", name, "A"], check=False)
    return r.stdout.split()


def _proxied(addrs: list[str]) -> bool:
    return bool(addrs) and all(a.startswith("100.96.") for a in addrs)


def _count_forwarded(fz: FzSystem, node: str, sources: dict[str, tuple[str, str]]) -> None:
    """(Re)create ``table inet fztest`` in ``node``: one forward-hook counter per tunnel source."""
    rules = []
    for name, (v4, v6) in sources.items():
        rules.append(f'\t\tip saddr {v4} counter comment "{name}"')
        rules.append(f'\t\tip6 saddr {v6} counter comment "{name}"')
    body = "\n".join(rules)
    text = ("add table inet fztest\ndelete table inet fztest\ntable inet fztest {\n"
            "\tchain forward {\n\t\ttype filter hook forward priority filter - 10; policy accept;\n"
            f"{body}\n\t}}\n}}\n")
    fz.lab.exec(node, ["nft", "-f", "-"], input=text)


def _forwarded(fz: FzSystem, node: str) -> dict[str, int]:
    """Packets the kernel of ``node`` forwarded per counted source (v4 and v6 summed)."""
    out = json.loads(fz.lab.exec(node, ["nft", "-j", "list", "table", "inet", "fztest"]).stdout)
    got: dict[str, int] = {}
    for item in out["nftables"]:
        rule: dict[str, Any] | None = item.get("rule")
        if not rule:
            continue
        packets = next(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
        got[rule["comment"]] = got.get(rule["comment"], 0) + packets
    return got


def _tunnel_ips(fz: FzSystem, node: str) -> tuple[str, str]:
    st = fz.status(node)
    assert st is not None
    iface = st["interface"]
    return str(iface["ipv4"]), str(iface["ipv6"])


def _bob_cannot_reach(fz: FzSystem) -> None:
    assert not RESOURCES & _resources(fz, "client-2")
    assert not _proxied(_dig(fz, "client-2", "dns.httpbin.test"))
    assert fz.curl("client-2", HTTP, timeout=4).returncode != 0
    assert fz.curl("client-2", DNS_URL, timeout=4).returncode != 0


def _alice_reaches(fz: FzSystem) -> None:
    r = fz.curl("client", HTTP)
    assert (r.returncode, r.stdout.strip()) == (0, "http"), f"{r.stderr}\n{fz.tails()}"
    r = fz.curl("client", DNS_URL)
    assert (r.returncode, r.stdout.strip()) == (0, "dns-host"), f"{r.stderr}\n{fz.tails()}"


# -- the scenario -----------------------------------------------------------------------------


def test_users_and_groups(fz: FzSystem) -> None:
    fz.start_portal()
    fz.start_relays()
    fz.admin("site", "add", SITE)
    fz.start_gateway("gateway-1", site=SITE)
    for group in (ENGINEERING, SALES):
        fz.admin("group", "add", group)
        fz._groups.add(group)
    for name, address in (("resource-net", "198.51.100.0/24"), ("dns-host", "dns.httpbin.test")):
        fz.admin("resource", "add", name, "--site", SITE, "--address", address)
        fz.admin("policy", "add", "--group", ENGINEERING, "--resource", name)

    fz.start_client("client", user=ALICE, groups=(ENGINEERING,))
    fz.start_client("client-2", user=BOB, groups=(SALES,))
    alice, bob = fz.status("client"), fz.status("client-2")
    assert alice is not None and bob is not None
    assert alice["user"]["email"] == ALICE and bob["user"]["email"] == BOB
    alice_ips, bob_ips = _tunnel_ips(fz, "client"), _tunnel_ips(fz, "client-2")
    assert alice_ips[0] != bob_ips[0] and alice_ips[1] != bob_ips[1]
    _count_forwarded(fz, "gateway-1", {"alice": alice_ips, "bob": bob_ips})

    # alice (engineering) is offered both resources and reaches them.
    fz.wait(lambda: _resources(fz, "client") >= RESOURCES, 15, "alice's resources")
    _alice_reaches(fz)
    assert _proxied(_dig(fz, "client", "dns.httpbin.test"))

    # bob (sales) is not offered them, cannot reach them, and the gateway forwards nothing of his.
    _bob_cannot_reach(fz)
    counts = _forwarded(fz, "gateway-1")
    assert counts["alice"] > 0, counts
    assert counts["bob"] == 0, counts
    assert not any(r.get("user") == BOB for r in fz.log_records("gateway-1")), "the gateway saw bob"

    # bob joins engineering: the portal pushes the resources to his client within seconds.
    t0 = time.monotonic()
    fz.admin("group", "add-member", ENGINEERING, BOB)
    fz.wait(lambda: _resources(fz, "client-2") >= RESOURCES, 10, "bob to be offered the resources")
    fz.wait(lambda: fz.curl("client-2", HTTP, timeout=3).stdout.strip() == "http", 20,
            "bob to reach the CIDR resource")
    took = time.monotonic() - t0
    assert took < 15, took
    r = fz.curl("client-2", DNS_URL)
    assert (r.returncode, r.stdout.strip()) == (0, "dns-host"), f"{r.stderr}\n{fz.tails()}"
    assert _forwarded(fz, "gateway-1")["bob"] > 0
    bob_id = next(r["client_id"] for r in fz.log_records("gateway-1")
                  if r.get("msg") == "access granted" and r.get("user") == BOB)
    _alice_reaches(fz)

    # bob leaves engineering again during a slow download: his resources go away, the gateway
    # cuts him off and the download stalls (curl gives up after 3 s below 1 kB/s).
    size = 5_000_000
    before = _forwarded(fz, "gateway-1")["bob"]
    download = fz.lab.popen("client-2", [
        "curl", "-sS", "-m", "50", "--limit-rate", "50k", "--speed-limit", "1000", "--speed-time", "3",
        "-o", "/dev/null", "-w", "%{size_download}", f"http://198.51.100.21/bytes/{size}"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, name="download")
    fz.wait(lambda: _forwarded(fz, "gateway-1")["bob"] > before + 20, 10, "bob's download to be under way")
    t_cut = time.monotonic()
    fz.admin("group", "remove-member", ENGINEERING, BOB)
    fz.wait(lambda: not RESOURCES & _resources(fz, "client-2"), 10, "bob's resources to be withdrawn")
    fz.wait(lambda: any(r.get("msg") == "access revoked" and r.get("client_id") == bob_id
                        for r in fz.log_records("gateway-1")), 10, "the gateway to revoke bob's access")
    out, _ = download.communicate(timeout=60)
    stalled_after = time.monotonic() - t_cut
    assert download.returncode != 0 and 0 < int(out or 0) < size, (download.returncode, out)
    assert stalled_after < 20, f"the download went on for {stalled_after:.1f} s after the removal"
    _count_forwarded(fz, "gateway-1", {"alice": alice_ips, "bob": bob_ips})  # counters back to zero
    _bob_cannot_reach(fz)
    assert _forwarded(fz, "gateway-1")["bob"] == 0
    # alice was never affected.
    _alice_reaches(fz)
    assert _forwarded(fz, "gateway-1")["alice"] > 0

    fz.stop("client-2")
    fz.stop("client")
    fz.assert_clean_logs()


def test_second_client_shares_the_client_site(lab: Lab) -> None:
    """client-2 sits next to client behind the same router, NAT and network conditions."""
    assert lab.addr("client-2") == "192.0.2.11" and lab.addr("client-2", 6) == "2001:db8:2::11"
    assert lab.ns("client-2") == f"{lab.prefix}-client2"
    conf = Path("/etc/netns") / lab.ns("client-2") / "resolv.conf"
    assert conf.read_text() == "nameserver 203.0.113.53\n"
    for family in (4, 6):
        for dst in ("portal", "relay-1", "public-dns", "gateway-router"):
            assert lab.exec("client-2", ["ping", f"-{family}", "-c1", "-W2", lab.addr(dst, family)],
                            check=False).returncode == 0, (dst, family)
        # The resource net and the gateway site stay out of reach.
        for dst in ("http", "gateway-1"):
            assert lab.exec("client-2", ["ping", f"-{family}", "-c1", "-W1", lab.addr(dst, family)],
                            check=False).returncode != 0, (dst, family)
    # Both clients leave through the router's masquerade: the internet sees the router's address.
    out = lab.exec("client-2", ["dig", "+short", "+time=2", "portal.example.test"]).stdout
    assert out.split() == ["203.0.113.10"]
    lab.popen("portal", ["python3", "-m", "http.server", "--bind", "203.0.113.10", "8099"], name="seen")
    deadline = time.monotonic() + 10
    while "8099" not in lab.exec("portal", ["ss", "-Hltn"]).stdout and time.monotonic() < deadline:
        time.sleep(0.05)
    for node in ("client", "client-2"):
        r = lab.exec(node, ["curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}",
                            "http://203.0.113.10:8099/"], check=False)
        assert r.stdout == "200", (node, r.stdout, r.stderr)
    log = lab.log_dir / "portal.seen.log"
    deadline = time.monotonic() + 5
    while log.read_text().count('"GET / HTTP/1.1" 200') < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    seen = log.read_text()
    assert seen.count('"GET / HTTP/1.1" 200') == 2 and "192.0.2." not in seen, seen
    assert seen.count("203.0.113.20 - -") == 2, seen
    # The two clients reach each other on the LAN bridge.
    assert lab.exec("client", ["ping", "-c1", "-W2", "192.0.2.11"], check=False).returncode == 0
    # The client router's loss rule applies to client-2 as well.
    lab.set_loss("client-router", 100)
    assert lab.exec("client-2", ["ping", "-c2", "-W1", "203.0.113.10"], check=False).returncode != 0
    lab.set_loss("client-router", 0)
    assert lab.exec("client-2", ["ping", "-c1", "-W2", "203.0.113.10"], check=False).returncode == 0
