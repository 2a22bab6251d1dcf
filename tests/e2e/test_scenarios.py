"""End-to-end scenarios of ACCEPTANCE.md: real portal, relays, gateway and client in a lab."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from typing import Any
from pathlib import Path

import pytest

from firezone.lab import Lab
from firezone.lab.topology import big_addresses
from tests.e2e.fz_lab_system import FZ, FzSystem, run_system

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

SITE = "lab"
USER = "alice@acme.test"
GROUP = "engineering"


@pytest.fixture
def fz(lab: Lab, tmp_path: Path) -> Iterator[FzSystem]:
    yield from run_system(lab, tmp_path)


def _base(fz: FzSystem) -> None:
    fz.start_portal()
    fz.start_relays()
    fz.admin("site", "add", SITE)
    fz.start_gateway("gateway-1", site=SITE)
    fz.admin("group", "add", GROUP)
    fz._groups.add(GROUP)


def _one_resource(fz: FzSystem, name: str, address: str, *filters: str) -> str:
    args = [a for f in filters for a in ("--filter", f)]
    fz.admin("resource", "add", name, "--site", SITE, "--address", address, *args)
    return str(fz.admin("policy", "add", "--group", GROUP, "--resource", name)["id"])


def test_direct_curl(fz: FzSystem) -> None:
    _base(fz)
    _one_resource(fz, "resource-net", "198.51.100.0/24")
    _one_resource(fz, "resource-net-v6", "2001:db8:51::/64")
    fz.start_client("client", user=USER, groups=(GROUP,))

    r = fz.curl("client", "http://198.51.100.10/")
    assert r.returncode == 0, f"curl failed: {r.stderr}\n{fz.tails()}"
    assert r.stdout.strip() == "http", r.stdout
    r6 = fz.curl("client", "http://[2001:db8:51::10]/")
    assert r6.returncode == 0, f"curl -6 failed: {r6.stderr}\n{fz.tails()}"
    assert r6.stdout.strip() == "http", r6.stdout

    # ICE may nominate a relayed pair first and move to the direct one a moment later.
    fz.wait(lambda: [c.get("path") for c in (fz.status("client") or {}).get("connections", [])] == ["direct"],
            10, "a direct path")
    st = fz.status("client")
    assert st is not None
    (conn,) = st["connections"]
    assert conn["state"] == "connected" and conn["path"] == "direct", conn
    assert conn["rx_bytes"] > 0 and conn["tx_bytes"] > 0, conn
    assert st["user"]["email"] == USER, st["user"]
    res = {r["name"]: r for r in st["resources"]}
    assert res["resource-net"]["status"] == "online", res
    assert res["resource-net"]["site"]["name"] == SITE
    # One flow-log line per flow on the gateway (TCP: once both FINs were seen, plus 5 s).
    fz.wait(lambda: any(r.get("msg") == "TCP flow completed" and r.get("inner_dst_ip") == "198.51.100.10"
                        for r in fz.log_records("gateway-1")), 15, "the gateway's flow log line")

    resolv_before = fz.lab.exec("client", ["cat", "/etc/resolv.conf"]).stdout
    assert "100.100.111.1" in resolv_before
    fz.stop("client")
    assert "100.100.111.1" not in fz.lab.exec("client", ["cat", "/etc/resolv.conf"]).stdout
    assert fz.lab.exec("gateway-1", ["nft", "list", "table", "inet", "firezone"], check=False).returncode == 0
    fz.stop("gateway-1")
    assert fz.lab.exec("gateway-1", ["nft", "list", "table", "inet", "firezone"], check=False).returncode != 0
    fz.assert_clean_logs()


@pytest.mark.parametrize("lab", [{"nat": "symmetric"}], indirect=True)
def test_relayed_curl(fz: FzSystem) -> None:
    _base(fz)
    _one_resource(fz, "resource-net", "198.51.100.0/24")
    fz.start_client("client", user=USER, groups=(GROUP,))
    r = fz.curl("client", "http://198.51.100.10/")
    assert r.returncode == 0, f"curl failed: {r.stderr}\n{fz.tails()}"
    assert r.stdout.strip() == "http"
    st = fz.status("client")
    assert st is not None
    (conn,) = st["connections"]
    assert conn["state"] == "connected" and conn["path"] == "relayed", conn
    fz.stop("client")
    fz.assert_clean_logs()


def test_dns_resource(fz: FzSystem) -> None:
    _base(fz)
    _one_resource(fz, "dns-host", "dns.httpbin.test")
    fz.admin("account", "set", "--search-domain", "httpbin.test")
    fz.start_client("client", user=USER, groups=(GROUP,))
    dig = fz.lab.exec("client", ["dig", "+short", "+time=3", "+tries=2", "dns.httpbin.test", "A"], check=False)
    assert dig.returncode == 0, dig.stderr
    addrs = dig.stdout.split()
    assert addrs and all(a.startswith("100.96.") for a in addrs), dig.stdout
    # A name that is no resource resolves to its real address through the system's resolver.
    public = fz.lab.exec("client", ["dig", "+short", "+time=3", "portal.example.test", "A"], check=False)
    assert public.stdout.split() == [fz.lab.addr("portal", 4)], public.stdout
    r = fz.curl("client", "http://dns.httpbin.test/")
    assert r.returncode == 0, f"curl failed: {r.stderr}\n{fz.tails()}"
    assert r.stdout.strip() == "dns-host", r.stdout
    # By its short name through the search domain the portal hands out.
    assert "search httpbin.test" in fz.lab.exec("client", ["cat", "/etc/resolv.conf"]).stdout
    short = fz.lab.exec("client", ["dig", "+search", "+short", "+time=3", "dns", "A"], check=False)
    assert sorted(short.stdout.split()) == sorted(addrs), short.stdout
    r = fz.curl("client", "http://dns/")
    assert r.returncode == 0 and r.stdout.strip() == "dns-host", f"{r.stderr}\n{fz.tails()}"

    # SIGHUP: the client reconnects to the portal and the resource keeps (or comes back to) working.
    import signal

    fz.procs["client"].send_signal(signal.SIGHUP)
    fz.wait(lambda: sum(r.get("msg") == "connected to the portal" for r in fz.log_records("client")) >= 2, 15,
            "the client to reconnect after SIGHUP")
    fz.wait(lambda: fz.curl("client", "http://dns.httpbin.test/", timeout=3).stdout.strip() == "dns-host", 30,
            "the DNS resource to work after the reconnect")

    before = fz.lab.exec("client", ["cat", "/etc/resolv.conf"]).stdout
    assert "nameserver 100.100.111.1" in before
    fz.stop("client")
    after = fz.lab.exec("client", ["cat", "/etc/resolv.conf"]).stdout
    assert "100.100.111.1" not in after and "httpbin.test" not in after and "nameserver" in after, after
    fz.assert_clean_logs()


def test_tcp_dns(fz: FzSystem) -> None:
    _base(fz)
    _one_resource(fz, "dns-host", "dns.httpbin.test")
    fz.start_client("client", user=USER, groups=(GROUP,))
    udp = _dig(fz, "dns.httpbin.test")
    assert udp and _proxied(udp), udp
    # The stub answers over TCP too, for resource and non-resource names.
    assert sorted(_dig(fz, "dns.httpbin.test", "+tcp")) == sorted(udp)
    assert _dig(fz, "portal.example.test", "+tcp") == [fz.lab.addr("portal", 4)]
    # big.example.test has 40 A records: without EDNS the UDP answer does not fit in 512 bytes.
    # The upstream's truncation reaches dig unchanged ...
    tc = fz.lab.exec("client", ["dig", "+noedns", "+ignore", "+time=3", "big.example.test", "A"], check=False)
    assert " tc" in tc.stdout.split("flags:")[1].split(";")[0], tc.stdout
    # ... and dig's retry over TCP gets every record through the stub.
    full = _dig(fz, "big.example.test", "+noedns")
    assert len(full) == 40 and sorted(full) == sorted(big_addresses("203.0.113")), full
    # With EDNS the answer fits in UDP; the OPT record comes back.
    edns = fz.lab.exec("client", ["dig", "+bufsize=4096", "+time=3", "big.example.test", "A"], check=False)
    flags = edns.stdout.split("flags:")[1].split(";")[0]
    assert " tc" not in flags and "OPT PSEUDOSECTION" in edns.stdout and "ANSWER: 40" in edns.stdout, edns.stdout
    fz.stop("client")
    fz.assert_clean_logs()


def test_policy_revoke(fz: FzSystem) -> None:
    _base(fz)
    policy = _one_resource(fz, "resource-net", "198.51.100.0/24")
    fz.start_client("client", user=USER, groups=(GROUP,))
    assert fz.curl("client", "http://198.51.100.10/").returncode == 0
    fz.admin("policy", "remove", policy)
    fz.wait(lambda: fz.curl("client", "http://198.51.100.10/", timeout=2).returncode != 0, 10,
            "access cut after the policy was removed")
    assert any(r.get("msg") == "access revoked" for r in fz.log_records("gateway-1"))
    fz.admin("policy", "add", "--group", GROUP, "--resource", "resource-net")
    fz.wait(lambda: fz.curl("client", "http://198.51.100.10/", timeout=3).returncode == 0, 20,
            "access back after the policy was re-added")
    fz.stop("client")
    fz.assert_clean_logs()


def test_filters(fz: FzSystem) -> None:
    _base(fz)
    _one_resource(fz, "resource-net", "198.51.100.0/24", "tcp/80")
    fz.start_client("client", user=USER, groups=(GROUP,))
    assert fz.curl("client", "http://198.51.100.10/").stdout.strip() == "http"
    import time

    t0 = time.monotonic()
    r = fz.curl("client", "http://198.51.100.10:8080/", timeout=10)
    took = time.monotonic() - t0
    assert r.returncode != 0 and took < 5, (r.returncode, r.stderr, took)
    # The refusal was the gateway's ICMP "administratively prohibited" for this resource's filter.
    refused = [x for x in fz.log_records("gateway-1")
               if x.get("msg") == "packet refused" and x.get("verdict") == "prohibited" and x.get("resource_id")]
    assert refused, fz.log_text("gateway-1")[-3000:]
    t0 = time.monotonic()
    d = fz.lab.exec("client", ["dig", "+tries=1", "+time=8", "@198.51.100.53", "http.httpbin.test"], check=False)
    took = time.monotonic() - t0
    assert d.returncode != 0 and took < 5, (d.stdout, took)
    fz.stop("client")
    fz.assert_clean_logs()


@pytest.mark.parametrize("lab", [{"nat": "symmetric"}], indirect=True)
def test_single_relay(fz: FzSystem) -> None:
    fz.start_portal()
    fz.start_relays(("relay-1",))
    fz.admin("site", "add", SITE)
    fz.start_gateway("gateway-1", site=SITE)
    fz.admin("group", "add", GROUP)
    fz._groups.add(GROUP)
    _one_resource(fz, "resource-net", "198.51.100.0/24")
    fz.start_client("client", user=USER, groups=(GROUP,))
    r = fz.curl("client", "http://198.51.100.10/")
    assert r.returncode == 0, f"curl failed: {r.stderr}\n{fz.tails()}"
    st = fz.status("client")
    assert st is not None and [c["path"] for c in st["connections"]] == ["relayed"], st
    assert len(st["relays"]) == 1, st["relays"]
    fz.stop("client")
    fz.assert_clean_logs()


def test_token_expiry(fz: FzSystem) -> None:
    _base(fz)
    _one_resource(fz, "resource-net", "198.51.100.0/24")
    fz.start_client("client", user=USER, groups=(GROUP,), expires="15")
    assert fz.curl("client", "http://198.51.100.10/").returncode == 0
    proc = fz.procs["client"]
    fz.wait(lambda: proc.poll() is not None, 40, "the client to stop after its token expired")
    assert proc.returncode == 1
    text = fz.log_text("client")
    assert "token_expired" in text and "the portal ended the session" in text, text[-2000:]
    # It cleaned up after itself: resolver configuration back, no TUN left.
    assert "100.100.111.1" not in fz.lab.exec("client", ["cat", "/etc/resolv.conf"]).stdout
    assert "tun-firezone" not in fz.lab.exec("client", ["ip", "link"]).stdout
    fz.assert_clean_logs()


def test_gateway_failover(fz: FzSystem) -> None:
    import time

    _base(fz)
    fz.start_gateway("gateway-2", site=SITE)
    _one_resource(fz, "resource-net", "198.51.100.0/24")
    fz.start_client("client", user=USER, groups=(GROUP,))
    assert fz.curl("client", "http://198.51.100.10/").returncode == 0
    st = fz.status("client")
    assert st is not None
    (conn,) = st["connections"]
    listed = fz.admin("gateway", "list")
    assert conn["gateway_id"] in {g["id"] for g in listed}, listed
    in_use = next(n for n in ("gateway-1", "gateway-2")
                  if any(r.get("msg") == "access granted" for r in fz.log_records(n)))
    fz.stop(in_use)
    t0 = time.monotonic()
    fz.wait(lambda: fz.curl("client", "http://198.51.100.10/", timeout=2).returncode == 0, 30,
            "the other gateway to serve the client")
    took = time.monotonic() - t0
    other = "gateway-2" if in_use == "gateway-1" else "gateway-1"
    # The portal handed the client to the other gateway (its "client connected" line follows ICE
    # nomination, which may come after the first data).
    assert any(r.get("msg") == "access granted" and r.get("user") == USER for r in fz.log_records(other))
    assert took < 20, took
    fz.stop("client")
    fz.assert_clean_logs()


def test_portal_down_and_restart(fz: FzSystem) -> None:
    _base(fz)
    _one_resource(fz, "resource-net", "198.51.100.0/24")
    _one_resource(fz, "dns-host", "dns.httpbin.test")
    fz.start_client("client", user=USER, groups=(GROUP,))
    assert fz.curl("client", "http://198.51.100.10/").returncode == 0
    assert fz.curl("client", "http://dns.httpbin.test/").stdout.strip() == "dns-host"
    # portal-down: established access keeps working without the control plane.
    fz.stop("portal")
    assert fz.curl("client", "http://198.51.100.10/").stdout.strip() == "http"
    assert fz.curl("client", "http://dns.httpbin.test/").stdout.strip() == "dns-host"
    # portal-restart: client and gateway reconnect by themselves; a new resource then works.
    fz.start_portal()
    for node in ("client", "gateway-1"):
        fz.wait(lambda n=node: sum(r.get("msg") == "connected to the portal" for r in fz.log_records(n)) >= 2,
                60, f"{node} to reconnect to the restarted portal")
    fz.admin("resource", "add", "iperf-host", "--site", SITE, "--address", "198.51.100.30/32")
    fz.admin("policy", "add", "--group", GROUP, "--resource", "iperf-host")
    fz.wait(lambda: fz.curl("client", "http://198.51.100.30/", timeout=3).stdout.strip() == "iperf3", 30,
            "the new resource to work")
    fz.stop("client")
    fz.assert_clean_logs()


def _download(fz: FzSystem, size: int, timeout: float) -> None:
    import hashlib

    url = f"http://198.51.100.21/bytes/{size}"
    r = fz.lab.exec("client", ["curl", "-sS", "-m", str(timeout), "-D", "/dev/stderr", "-o", "/dev/stdout", url],
                    check=False, timeout=timeout + 10, text=False)
    assert r.returncode == 0, r.stderr[-2000:]
    headers = r.stderr.decode(errors="replace").lower()
    want = next(line.split(":", 1)[1].strip() for line in headers.splitlines() if line.startswith("x-sha256:"))
    assert len(r.stdout) == size
    assert hashlib.sha256(r.stdout).hexdigest() == want


@pytest.mark.parametrize("lab", [{"nat": "symmetric"}], indirect=True)
def test_download_relayed(fz: FzSystem) -> None:
    _base(fz)
    _one_resource(fz, "resource-net", "198.51.100.0/24")
    fz.start_client("client", user=USER, groups=(GROUP,))
    _download(fz, 10 * 1024 * 1024, 60)
    st = fz.status("client")
    assert st is not None and [c["path"] for c in st["connections"]] == ["relayed"], st
    fz.stop("client")
    fz.assert_clean_logs()


@pytest.mark.parametrize("lab", [{"loss": 20.0}], indirect=True)
def test_download_packet_loss(fz: FzSystem) -> None:
    _base(fz)
    _one_resource(fz, "resource-net", "198.51.100.0/24")
    fz.start_client("client", user=USER, groups=(GROUP,))
    # The first packets may be lost too: retry the connection setup a few times.
    fz.wait(lambda: fz.curl("client", "http://198.51.100.10/", timeout=5).returncode == 0, 60, "first contact")
    _download(fz, 10 * 1024 * 1024, 180)
    fz.stop("client")
    fz.assert_clean_logs()


@pytest.mark.parametrize("lab", [{"nat": "symmetric"}], indirect=True)
def test_relay_restart(fz: FzSystem) -> None:
    _base(fz)
    _one_resource(fz, "resource-net", "198.51.100.0/24")
    fz.start_client("client", user=USER, groups=(GROUP,))
    assert fz.curl("client", "http://198.51.100.10/").returncode == 0
    for node in ("relay-1", "relay-2"):
        fz.stop(node)
    fz.wait(lambda: not fz.admin("relay", "list"), 20, "the relays to leave")
    fz.start_relays()  # new secrets, new relay ids
    fz.wait(lambda: fz.curl("client", "http://198.51.100.10/", timeout=3).returncode == 0, 60,
            "the relayed connection to recover")
    fz.wait(lambda: [c.get("path") for c in (fz.status("client") or {}).get("connections", [])] == ["relayed"],
            10, "a relayed path")
    fz.stop("client")
    fz.assert_clean_logs()


def _dig(fz: FzSystem, name: str, *extra: str) -> list[str]:
    r = fz.lab.exec("client", ["dig", "+short", "+time=3", "+tries=2", *extra, name, "A"], check=False)
    return r.stdout.split()


def _proxied(addrs: list[str]) -> bool:
    return bool(addrs) and all(a.startswith("100.96.") for a in addrs)


def test_dns_wildcard(fz: FzSystem) -> None:
    _base(fz)
    _one_resource(fz, "one-level", "*.httpbin.test")
    fz.start_client("client", user=USER, groups=(GROUP,))
    assert _proxied(_dig(fz, "dns.httpbin.test"))
    assert _proxied(_dig(fz, "httpbin.test"))  # the apex
    assert not _proxied(_dig(fz, "deep.sub.httpbin.test"))  # two labels deep: not this pattern
    assert fz.curl("client", "http://dns.httpbin.test/").stdout.strip() == "dns-host"
    fz.admin("resource", "add", "any-depth", "--site", SITE, "--address", "**.sub.httpbin.test")
    fz.admin("policy", "add", "--group", GROUP, "--resource", "any-depth")
    fz.wait(lambda: _proxied(_dig(fz, "deep.sub.httpbin.test")), 15, "the ** resource to match")
    assert _proxied(_dig(fz, "sub.httpbin.test"))
    fz.stop("client")
    fz.assert_clean_logs()


def test_dns_two_resources(fz: FzSystem) -> None:
    import concurrent.futures

    _base(fz)
    _one_resource(fz, "dns-host", "dns.httpbin.test")
    _one_resource(fz, "download", "download.httpbin.test")
    fz.start_client("client", user=USER, groups=(GROUP,))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        a = pool.submit(fz.curl, "client", "http://dns.httpbin.test/")
        b = pool.submit(fz.curl, "client", "http://download.httpbin.test/")
        assert a.result().stdout.strip() == "dns-host", a.result()
        assert b.result().stdout.strip() == "download", b.result()
    # Two names, two sets of proxy IPs, each mapped to its own real address by the gateway.
    assert set(_dig(fz, "dns.httpbin.test")).isdisjoint(_dig(fz, "download.httpbin.test"))
    fz.stop("client")
    fz.assert_clean_logs()


def test_dns_shared_ip(fz: FzSystem) -> None:
    _base(fz)
    # download. and alias. resolve to the same real address (198.51.100.21) at the gateway.
    _one_resource(fz, "download", "download.httpbin.test", "tcp/80")
    _one_resource(fz, "alias", "alias.httpbin.test", "tcp/8080")
    fz.start_client("client", user=USER, groups=(GROUP,))
    assert fz.curl("client", "http://download.httpbin.test/").stdout.strip() == "download"
    assert fz.curl("client", "http://alias.httpbin.test:8080/").stdout.strip() == "download"
    # What one name allows does not leak to the other although the real IP is the same.
    assert fz.curl("client", "http://download.httpbin.test:8080/", timeout=5).returncode != 0
    assert fz.curl("client", "http://alias.httpbin.test/", timeout=5).returncode != 0
    fz.stop("client")
    fz.assert_clean_logs()


# A client that asks for a resource it was never offered (a modified or stale client): it speaks
# the control protocol from the client host with the user's own token.
_RAW_REQUEST = """
import asyncio, base64, json, os, sys, uuid
import aiohttp

async def main(url, token, rid):
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(url.replace("http", "ws", 1) + "/client", headers={"Authorization": "Bearer " + token},
                                   params={"external_id": str(uuid.uuid4()), "public_key": base64.b64encode(os.urandom(32)).decode(), "name": "raw"})
        await ws.send_str(json.dumps({"topic": "client", "event": "phx_join", "payload": {}, "ref": "1"}))
        await ws.send_str(json.dumps({"topic": "client", "event": "request_authorization",
                                      "payload": {"resource_id": rid}, "ref": "2"}))
        while True:
            frame = json.loads((await ws.receive(timeout=10)).data)
            if frame["event"] == "authorization_creation_failed":
                print(json.dumps(frame["payload"]))
                return

asyncio.run(main(*sys.argv[1:]))
"""


def test_default_deny(fz: FzSystem) -> None:
    _base(fz)
    _one_resource(fz, "resource-net", "198.51.100.10/32")
    # No policy names this one; the one policy for it is for a group alice is not in.
    hidden = fz.admin("resource", "add", "download-host", "--site", SITE, "--address", "198.51.100.21")
    fz.add_user("bob@acme.test", ("sales",))
    fz.admin("policy", "add", "--group", "sales", "--resource", "download-host")
    fz.admin("resource", "add", "alias", "--site", SITE, "--address", "alias.httpbin.test")
    fz.start_client("client", user=USER, groups=(GROUP,))
    assert fz.curl("client", "http://198.51.100.10/").stdout.strip() == "http", fz.tails()

    # Neither is offered, so the client neither routes nor resolves them: nothing reaches them.
    st = fz.status("client")
    assert st is not None and [r["name"] for r in st["resources"]] == ["resource-net"], st["resources"]
    assert fz.curl("client", "http://198.51.100.21/", timeout=4).returncode != 0
    dig = fz.lab.exec("client", ["dig", "+short", "+time=3", "alias.httpbin.test"], check=False)
    assert not any(a.startswith("100.96.") for a in dig.stdout.split()), dig.stdout
    assert fz.curl("client", "http://alias.httpbin.test/", timeout=4).returncode != 0
    # The gateway's flow log (a line once a TCP flow has ended) shows only the allowed host.
    fz.wait(lambda: any(r.get("inner_dst_ip") for r in fz.log_records("gateway-1")), 15, "a flow log line")
    flows = {r["inner_dst_ip"] for r in fz.log_records("gateway-1") if r.get("inner_dst_ip")}
    assert flows == {"198.51.100.10"}, flows

    # Asking anyway gets the answer an unknown id gets; the portal audits the denial by name.
    raw = fz.lab.exec("client", [sys.executable, "-c", _RAW_REQUEST, fz.portal_url,
                                 fz.token("client", "--user", USER, "--expires", "1h"), hidden["id"]], env=fz.env, check=False)
    assert raw.returncode == 0, raw.stderr
    assert json.loads(raw.stdout) == {"resource_id": hidden["id"], "reason": "not_found"}
    denials = [a for a in fz.audit() if a.get("result") == "deny"]
    assert [(d["reason"], d["resource"]["name"], d["actor"]["email"]) for d in denials] == \
        [("no_policy", "download-host", USER)], denials
    explain = fz.lab.exec("portal", [*FZ, "--portal", fz.portal_url, "policy", "explain", "--user", USER,
                                     "--resource", "download-host"], env=fz.env, check=False)
    assert explain.returncode == 3 and "no policy" in explain.stdout, explain.stdout + explain.stderr
    fz.stop("client")
    fz.assert_clean_logs()


def test_conditions(fz: FzSystem) -> None:
    _base(fz)
    fz.admin("resource", "add", "resource-net", "--site", SITE, "--address", "198.51.100.10")
    # The client's remote IP (its router's public address) is not in this range: the condition fails.
    fz.admin("policy", "add", "--group", GROUP, "--resource", "resource-net", "--condition",
             "remote_ip in 192.0.2.0/24")
    # A time window on another day of the week (whole day, UTC).
    tomorrow = "MTWRFSU"[(time.gmtime().tm_wday + 1) % 7]
    fz.admin("resource", "add", "dns-host", "--site", SITE, "--address", "dns.httpbin.test")
    fz.admin("policy", "add", "--group", GROUP, "--resource", "dns-host", "--condition",
             f"time in {tomorrow}/true/UTC")
    fz.start_client("client", user=USER, groups=(GROUP,))

    # The client knows both (a policy of its group names them) and asks; the portal refuses each.
    r = fz.curl("client", "http://198.51.100.10/", timeout=5)
    assert r.returncode != 0, r.stdout
    dig = fz.lab.exec("client", ["dig", "+short", "+time=3", "dns.httpbin.test"], check=False)
    assert dig.stdout.split() and all(a.startswith("100.96.") for a in dig.stdout.split()), dig.stdout
    assert fz.curl("client", "http://dns.httpbin.test/", timeout=5).returncode != 0

    def why() -> dict[str, tuple[str, list[str]]]:
        st = fz.status("client") or {}
        return {r["name"]: (r["status"], r.get("violated_properties") or []) for r in st.get("resources", [])}

    fz.wait(lambda: why() == {"resource-net": ("forbidden", ["remote_ip"]),
                              "dns-host": ("forbidden", ["current_utc_datetime"])}, 10, "both refusals shown")
    # People see the same in the table.
    human = fz.lab.exec("client", [*FZ, "client", "status", "--control-socket", fz.control_socket("client")],
                        env=fz.env, check=False)
    assert "forbidden (remote_ip)" in human.stdout and "forbidden (current_utc_datetime)" in human.stdout, \
        human.stdout
    denials = {d["resource"]["name"]: d for d in fz.audit() if d.get("result") == "deny"}
    assert denials["resource-net"]["reason"] == "forbidden", denials
    assert denials["resource-net"]["violated_properties"] == ["remote_ip"]
    assert denials["resource-net"]["remote_ip"] == fz.lab.addr("client-router", 4)
    assert denials["dns-host"]["violated_properties"] == ["current_utc_datetime"]
    assert all(d["actor"]["email"] == USER for d in denials.values())
    assert not [r for r in fz.log_records("gateway-1") if r.get("inner_dst_ip")]

    # Widen the range to the client's network: the next attempt gets through.
    pid = fz.admin("policy", "list", "--resource", "resource-net")[0]["id"]
    fz.admin("policy", "update", pid, "--condition", f"remote_ip in {fz.lab.addr('client-router', 4)}/32")
    fz.wait(lambda: fz.curl("client", "http://198.51.100.10/", timeout=3).stdout.strip() == "http", 20,
            "access once the condition holds")
    fz.stop("client")
    fz.assert_clean_logs()


def test_internet_resource(fz: FzSystem) -> None:
    _base(fz)
    _one_resource(fz, "resource-net", "198.51.100.0/24")
    fz.admin("site", "add", "egress")
    fz.start_gateway("gateway-2", site="egress")
    fz.admin("resource", "add", "Internet", "--site", "egress", "--type", "internet")
    fz.admin("policy", "add", "--group", GROUP, "--resource", "Internet")
    fz.start_client("client", user=USER, groups=(GROUP,))
    home4, home6 = fz.lab.addr("client-router", 4), fz.lab.addr("client-router", 6)
    egress4, egress6 = fz.lab.addr("gateway-router", 4), fz.lab.addr("gateway-router", 6)

    def seen_as(family: str = "-4") -> str:
        return fz.curl("client", "http://www.example.test/ip", timeout=5, extra=(family,)).stdout.strip()

    def internet(*args: str) -> dict[str, Any]:
        r = fz.lab.exec("client", [*FZ, "--json", "client", "internet", *args, "--control-socket",
                                   fz.control_socket("client")], env=fz.env, check=False)
        assert r.returncode == 0, r.stderr
        return dict(json.loads(r.stdout))

    # Off by default: the web sees the client's own site.
    assert internet() == {"enabled": False, "offered": True}
    assert seen_as() == home4 and seen_as("-6") == home6
    assert internet("on") == {"enabled": True, "offered": True}
    fz.wait(lambda: seen_as() == egress4, 20, "web traffic leaving through the egress gateway")
    assert seen_as("-6") == egress6
    rules = fz.lab.exec("client", ["ip", "rule", "show"]).stdout
    assert "not from all fwmark 0x2021fd00 lookup" in rules, rules
    # fz's own traffic stays outside: the portal session holds and resources still work.
    st = fz.status("client")
    assert st is not None and st["portal"]["connected"], st["portal"]
    assert fz.curl("client", "http://198.51.100.10/").stdout.strip() == "http"
    gateways = {c["gateway_id"] for c in (fz.status("client") or {}).get("connections", [])}
    assert len(gateways) == 2, gateways

    assert internet("off")["enabled"] is False
    fz.wait(lambda: seen_as() == home4, 10, "web traffic back on the client's own site")
    assert "fwmark 0x2021fd00" not in fz.lab.exec("client", ["ip", "rule", "show"]).stdout
    internet("on")
    fz.wait(lambda: seen_as() == egress4, 20, "the egress gateway again")
    fz.stop("client")
    assert "fwmark 0x2021fd00" not in fz.lab.exec("client", ["ip", "rule", "show"]).stdout
    assert seen_as() == home4

    # Started with --internet on, then killed: the rules outlive it until the next start.
    fz.start_client("client", user=USER, extra=("--internet", "on"))
    fz.wait(lambda: seen_as() == egress4, 20, "the egress gateway from the start")
    fz.procs["client"].kill()
    fz.procs["client"].wait(10)
    assert "fwmark 0x2021fd00" in fz.lab.exec("client", ["ip", "rule", "show"]).stdout
    fz.start_client("client", user=USER)
    assert "fwmark 0x2021fd00" not in fz.lab.exec("client", ["ip", "rule", "show"]).stdout
    assert any(r.get("msg", "").startswith("removed the full-tunnel routing rules") for r in fz.log_records("client"))
    assert seen_as() == home4
    fz.stop("client")
    fz.assert_clean_logs()
