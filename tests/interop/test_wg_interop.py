"""``fz wg up`` against Debian's wireguard-go + wg, in two network namespaces made by the test.

    ns "fz"   eth0 192.0.2.1/24  <-- veth -->  eth0 192.0.2.2/24   ns "go"
    fz wg up  100.64.0.1/24                    wireguard-go 100.64.0.2/24

Only the initiating side is given the other's Endpoint, so which side starts the handshake is
certain and the responder must learn the endpoint from the handshake.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop import wg_helpers as h
from tests.interop.netns import Topology, wait_until

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

FZ_IP, GO_IP = "100.64.0.1", "100.64.0.2"
FZ_UNDERLAY, GO_UNDERLAY = "192.0.2.1", "192.0.2.2"
FZ_PORT, GO_PORT = 51820, 51821


@pytest.fixture(scope="module", autouse=True)
def _prerequisites() -> None:
    if os.geteuid() != 0:
        pytest.fail("the WireGuard interop tests need root (network namespaces, TUN)")
    for tool in ("wireguard-go", "wg", "ip", "ping"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (Debian packages wireguard-go, wireguard-tools)")


@pytest.fixture
def topo() -> Iterator[Topology]:
    t = Topology("wg")
    try:
        yield t
    finally:
        t.close()


def make_pair(topo: Topology, *, initiator: str, psk: bool,
              go_keepalive: int | None = None) -> tuple[h.Side, h.Side]:
    a, b = topo.netns("fz"), topo.netns("go")
    topo.veth(a, b, f"{FZ_UNDERLAY}/24", f"{GO_UNDERLAY}/24")
    (fz_priv, fz_pub), (go_priv, go_pub) = h.keypair(), h.keypair()
    shared = h.genpsk() if psk else None
    fz = h.Side(a, topo.ifname("f"), fz_priv, fz_pub, FZ_PORT, FZ_IP, "fz")
    go = h.Side(b, topo.ifname("g"), go_priv, go_pub, GO_PORT, GO_IP, "wggo")
    fz.peers = [h.PeerSpec(go_pub, [f"{GO_IP}/32"], preshared_key=shared,
                           endpoint=f"{GO_UNDERLAY}:{GO_PORT}" if initiator == "fz" else None)]
    go.peers = [h.PeerSpec(fz_pub, [f"{FZ_IP}/32"], preshared_key=shared,
                           endpoint=f"{FZ_UNDERLAY}:{FZ_PORT}" if initiator == "wggo" else None,
                           keepalive=go_keepalive)]
    h.start_wggo(go)
    h.start_fz(fz, verbose=1)
    return fz, go


def fz_show(fz: h.Side) -> dict:
    out = subprocess.run([*h.fz_command(), "--json", "wg", "show", fz.ifname], capture_output=True,
                         text=True, timeout=10, check=True, cwd=str(Path(__file__).resolve().parents[2]))
    return json.loads(out.stdout)


def assert_clean_log(topo: Topology, fz: h.Side) -> None:
    log = topo.log(fz.ifname)
    assert "Traceback" not in log, log
    assert '"level": "ERROR"' not in log, log


@pytest.mark.parametrize("psk", [False, True], ids=["no-psk", "psk"])
@pytest.mark.parametrize("initiator", ["fz", "wggo"])
def test_handshake_and_ping_both_ways(topo: Topology, initiator: str, psk: bool) -> None:
    fz, go = make_pair(topo, initiator=initiator, psk=psk)
    first, second = (fz, go) if initiator == "fz" else (go, fz)
    h.ping_until_up(first.ns, second.tunnel_ip)
    for src, dst in ((first, second), (second, first)):
        r = src.ns.run(["ping", "-c", "5", "-i", "0.2", "-W", "2", dst.tunnel_ip], check=False)
        assert r.returncode == 0 and " 0% packet loss" in r.stdout, r.stdout

    # wireguard-go's view of us: a completed handshake, our endpoint, and bytes both ways
    peers = h.wg_dump(go.ns, go.ifname)
    me = peers[fz.public_key]
    assert time.time() - 60 < me["latest_handshake"] <= time.time() + 1
    assert me["endpoint"] == f"{FZ_UNDERLAY}:{FZ_PORT}"
    assert me["rx"] > 10 * 84 and me["tx"] > 10 * 84  # 10 pings each way, 84 bytes each plus overhead

    # our view of it, through the UAPI socket
    info = fz_show(fz)
    (peer,) = info["peers"]
    assert peer["public_key"] == go.public_key
    assert peer["endpoint"] == f"{GO_UNDERLAY}:{GO_PORT}"
    assert peer["preshared_key"] is psk
    assert peer["latest_handshake"] and time.time() - 60 < peer["latest_handshake"] <= time.time() + 1
    # What one side sent is what the other received. wireguard-go also counts handshake
    # messages (148-byte initiation, 92-byte response); the fz engine counts transport data only.
    for ours, theirs in ((peer["rx_bytes"], me["tx"]), (peer["tx_bytes"], me["rx"])):
        assert ours > 10 * 84 and 0 <= theirs - ours <= 2 * 148, (ours, theirs)
    assert_clean_log(topo, fz)


def test_tcp_transfer_roaming_and_wg_show(topo: Topology, tmp_path: Path) -> None:
    fz, go = make_pair(topo, initiator="fz", psk=True)
    h.ping_until_up(fz.ns, GO_IP)
    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(10 * 1024 * 1024))

    n, got, want = h.tcp_transfer(go.ns, fz.ns, GO_IP, blob, port=5001)
    assert (n, got) == (10 * 1024 * 1024, want), "wireguard-go -> fz transfer corrupted"
    n, got, want = h.tcp_transfer(fz.ns, go.ns, FZ_IP, blob, port=5002)
    assert (n, got) == (10 * 1024 * 1024, want), "fz -> wireguard-go transfer corrupted"

    before = h.wg_dump(go.ns, go.ifname)[fz.public_key]
    assert before["rx"] > 10 * 1024 * 1024 and before["tx"] > 10 * 1024 * 1024

    # `wg show` from wireguard-tools reads our interface through the UAPI socket too
    ours = fz.ns.run(["wg", "show", fz.ifname, "dump"]).stdout.splitlines()
    peer_line = ours[1].split("\t")
    assert peer_line[0] == go.public_key and peer_line[2] == f"{GO_UNDERLAY}:{GO_PORT}"
    assert int(peer_line[5]) > 10 * 1024 * 1024  # rx

    # the peer's source port changes: traffic from it carries on, and we follow it
    new_port = GO_PORT + 100
    go.ns.run(["wg", "set", go.ifname, "listen-port", str(new_port)])
    h.ping_until_up(go.ns, FZ_IP, timeout=10)
    wait_until(lambda: fz_show(fz)["peers"][0]["endpoint"] == f"{GO_UNDERLAY}:{new_port}", 5,
               what="fz to follow the new source port")
    r = fz.ns.run(["ping", "-c", "5", "-i", "0.2", "-W", "2", GO_IP], check=False)
    assert r.returncode == 0 and " 0% packet loss" in r.stdout, r.stdout
    n, got, want = h.tcp_transfer(go.ns, fz.ns, GO_IP, blob, port=5003)
    assert (n, got) == (10 * 1024 * 1024, want)
    assert_clean_log(topo, fz)


def test_sigterm_removes_interface_and_socket(topo: Topology) -> None:
    fz, _go = make_pair(topo, initiator="fz", psk=False)
    assert fz.ns.run(["ip", "link", "show", fz.ifname], check=False).returncode == 0
    assert topo.stop(fz.proc) == 0
    assert fz.ns.run(["ip", "link", "show", fz.ifname], check=False).returncode != 0
    assert not (h.FZ_RUN_DIR / f"{fz.ifname}.sock").exists()
    assert not (Path("/run/wireguard") / f"{fz.ifname}.sock").is_symlink()


def test_malformed_config_names_line_and_key(tmp_path: Path) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_text("[Interface]\nPrivateKey = " + "A" * 43 + "=\nListenPort = 99999\n")
    r = subprocess.run([*h.fz_command(), "wg", "up", str(conf)], capture_output=True, text=True,
                       timeout=30, check=False)
    assert r.returncode == 1
    assert r.stderr.strip() == f"fz: error: {conf}: line 3: key 'ListenPort': port 99999 is not in 0..65535"
    assert "Traceback" not in r.stderr


def test_key_tools_match_wg(tmp_path: Path) -> None:
    fz = h.fz_command()
    priv = subprocess.run([*fz, "wg", "genkey"], capture_output=True, text=True, check=True).stdout
    assert len(priv) == 45 and priv.endswith("=\n")
    ours = subprocess.run([*fz, "wg", "pubkey"], input=priv, capture_output=True, text=True, check=True).stdout
    theirs = subprocess.run(["wg", "pubkey"], input=priv, capture_output=True, text=True, check=True).stdout
    assert ours == theirs and len(ours) == 45
    # and the other way round: a key made by wg
    wpriv = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout
    ours = subprocess.run([*fz, "wg", "pubkey"], input=wpriv, capture_output=True, text=True, check=True).stdout
    theirs = subprocess.run(["wg", "pubkey"], input=wpriv, capture_output=True, text=True, check=True).stdout
    assert ours == theirs
    psk = subprocess.run([*fz, "wg", "genpsk"], capture_output=True, text=True, check=True).stdout
    assert len(psk) == 45 and psk.endswith("=\n")
    # wg accepts our keys as keys
    (tmp_path / "psk").write_text(psk)
    subprocess.run(["wg", "pubkey"], input=psk, capture_output=True, text=True, check=True)
    bad = subprocess.run([*fz, "wg", "pubkey"], input="nope\n", capture_output=True, text=True,
                         check=False)
    assert bad.returncode == 1 and bad.stderr == "fz: error: key is not the correct length or format\n"


@pytest.mark.parametrize("offload", [True, False], ids=["gso-gro", "no-offload"])
def test_fz_to_fz_transfer(topo: Topology, offload: bool, tmp_path: Path) -> None:
    """Two fz ends: with UDP GSO/GRO a whole run of datagrams crosses in one syscall each way,
    and TCP segments reach the TUN merged."""
    a, b = topo.netns("a"), topo.netns("b")
    topo.veth(a, b, f"{FZ_UNDERLAY}/24", f"{GO_UNDERLAY}/24")
    (pa, ka), (pb, kb) = h.keypair(), h.keypair()
    shared = h.genpsk()
    A = h.Side(a, topo.ifname("a"), pa, ka, FZ_PORT, FZ_IP, "fz")
    B = h.Side(b, topo.ifname("b"), pb, kb, GO_PORT, GO_IP, "fz")
    A.peers = [h.PeerSpec(kb, [f"{GO_IP}/32"], preshared_key=shared, endpoint=f"{GO_UNDERLAY}:{GO_PORT}")]
    B.peers = [h.PeerSpec(ka, [f"{FZ_IP}/32"], preshared_key=shared)]
    extra = [] if offload else ["--no-gso", "--no-gro", "--no-tun-offload"]
    h.start_fz(A, extra_args=extra)
    h.start_fz(B, extra_args=extra)
    h.ping_until_up(a, GO_IP)
    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(10 * 1024 * 1024))
    for server, client, ip, port in ((b, a, GO_IP, 5001), (a, b, FZ_IP, 5002)):
        n, got, want = h.tcp_transfer(server, client, ip, blob, port=port)
        assert (n, got) == (10 * 1024 * 1024, want)
    for side in (A, B):
        assert topo.stop(side.proc) == 0
        assert_clean_log(topo, side)


def test_ipv6_underlay_and_inner_addresses(topo: Topology) -> None:
    """Endpoints over IPv6 (the second UDP socket) and IPv6 inside the tunnel."""
    a, b = topo.netns("fz"), topo.netns("go")
    topo.veth(a, b, "2001:db8:1::1/64", "2001:db8:1::2/64")
    (fz_priv, fz_pub), (go_priv, go_pub) = h.keypair(), h.keypair()
    fz = h.Side(a, topo.ifname("f"), fz_priv, fz_pub, FZ_PORT, FZ_IP, "fz")
    go = h.Side(b, topo.ifname("g"), go_priv, go_pub, GO_PORT, GO_IP, "wggo")
    fz.peers = [h.PeerSpec(go_pub, [f"{GO_IP}/32", "fd00:2021:1111::2/128"],
                           endpoint=f"[2001:db8:1::2]:{GO_PORT}")]
    go.peers = [h.PeerSpec(fz_pub, [f"{FZ_IP}/32", "fd00:2021:1111::1/128"])]
    h.start_wggo(go)
    go.ns.run(["ip", "-6", "addr", "add", "fd00:2021:1111::2/64", "dev", go.ifname, "nodad"])
    h.start_fz(fz)
    a.run(["ip", "-6", "addr", "add", "fd00:2021:1111::1/64", "dev", fz.ifname, "nodad"])
    h.ping_until_up(a, "fd00:2021:1111::2")
    r = b.run(["ping", "-c", "3", "-i", "0.2", "-W", "2", "fd00:2021:1111::1"], check=False)
    assert r.returncode == 0 and " 0% packet loss" in r.stdout, r.stdout
    h.ping_until_up(b, FZ_IP)
    peer = h.wg_dump(b, go.ifname)[fz.public_key]
    assert peer["endpoint"] == f"[2001:db8:1::1]:{FZ_PORT}"
    assert fz_show(fz)["peers"][0]["endpoint"] == f"[2001:db8:1::2]:{GO_PORT}"
    assert_clean_log(topo, fz)


def test_cryptokey_routing_to_two_peers_and_junk_input(topo: Topology) -> None:
    """One fz interface, two wireguard-go peers: each tunnel address goes to the peer whose
    AllowedIPs hold it, a spoofed inner source is dropped, and garbage on the UDP port is ignored."""
    a, b, c = topo.netns("fz"), topo.netns("g1"), topo.netns("g2")
    topo.veth(a, b, "192.0.2.1/25", "192.0.2.2/25", a_if="eth0")
    topo.veth(a, c, "192.0.2.129/25", "192.0.2.130/25", a_if="eth1")
    (fp, fk), (p1, k1), (p2, k2) = h.keypair(), h.keypair(), h.keypair()
    fz = h.Side(a, topo.ifname("f"), fp, fk, FZ_PORT, FZ_IP, "fz")
    g1 = h.Side(b, topo.ifname("g"), p1, k1, GO_PORT, "100.64.0.2", "wggo")
    g2 = h.Side(c, topo.ifname("h"), p2, k2, GO_PORT, "100.64.0.3", "wggo")
    fz.peers = [h.PeerSpec(k1, ["100.64.0.2/32"], endpoint=f"192.0.2.2:{GO_PORT}"),
                h.PeerSpec(k2, ["100.64.0.3/32"], endpoint=f"192.0.2.130:{GO_PORT}")]
    # g2 claims more than fz gives it: packets it sends with 100.64.0.99 as source must not pass
    g1.peers = [h.PeerSpec(fk, ["100.64.0.0/24"])]
    g2.peers = [h.PeerSpec(fk, ["100.64.0.0/24"])]
    h.start_wggo(g1)
    h.start_wggo(g2)
    h.start_fz(fz)
    h.ping_until_up(a, "100.64.0.2")
    h.ping_until_up(a, "100.64.0.3")
    d1, d2 = h.wg_dump(b, g1.ifname)[fk], h.wg_dump(c, g2.ifname)[fk]
    assert d1["rx"] > 0 and d2["rx"] > 0

    c.run(["ip", "addr", "add", "100.64.0.99/32", "dev", g2.ifname])
    r = c.run(["ping", "-c", "2", "-W", "1", "-I", "100.64.0.99", FZ_IP], check=False)
    assert r.returncode != 0, "a source outside the peer's AllowedIPs must be dropped"

    junk = ("import os, socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "for n in (0, 1, 3, 4, 32, 148, 92, 64, 1500):\n"
            "    for t in (1, 2, 3, 4, 9):\n"
            f"        s.sendto(bytes([t, 0, 0, 0]) + os.urandom(max(n - 4, 0)), ('192.0.2.1', {FZ_PORT}))\n")
    b.run([sys.executable, "-c", junk])
    r = a.run(["ping", "-c", "3", "-i", "0.2", "-W", "2", "100.64.0.2"], check=False)
    assert r.returncode == 0 and " 0% packet loss" in r.stdout, r.stdout
    info = fz_show(fz)
    assert {p["endpoint"] for p in info["peers"]} == {f"192.0.2.2:{GO_PORT}", f"192.0.2.130:{GO_PORT}"}
    assert topo.stop(fz.proc) == 0
    (down,) = [json.loads(line) for line in topo.log(fz.ifname).splitlines() if "interface down" in line]
    assert down["drops"]["allowed_ips"] >= 2  # the spoofed pings, counted where they were dropped
    assert down["drops"]["malformed"] > 0  # some of the junk
    assert_clean_log(topo, fz)
