"""Two real nodes (NodeDriver + TUN) in the lab, behind real nftables NATs, with real relays.

The client's first packet makes the harness create the connection on both sides (the portal's
role); ICE picks a path that must match the NAT mode: a direct one (host or server-reflexive)
behind endpoint-independent NATs, a relayed one behind symmetric NATs or with UDP between the
sites dropped. Then ping both ways and a 5 MB TCP transfer through the tunnel.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from firezone.lab import Lab
from firezone.lab.httpd import payload
from tests.e2e.node_peer import CLIENT_TUN_IP, GATEWAY_TUN_IP, REPO, LabPair

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

TRANSFER_BYTES = 5 * 1024 * 1024
HTTP_PORT = 8000
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _established(ev: dict[str, Any]) -> bool:
    return ev["event"] == "established"


def _cpu_seconds(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / CLK_TCK


def _wait_tcp(lab: Lab, node: str, port: int, proc: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server in {node} exited; log {proc.log_path}"
        if f":{port} " in lab.exec(node, ["ss", "-Hltn"]).stdout:
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listening on TCP {port} in {node}")


@pytest.mark.parametrize(
    ("lab", "paths"),
    [
        pytest.param({"nat": "easy"}, {"host", "srflx"}, id="easy-direct"),
        pytest.param({"nat": "symmetric"}, {"relay"}, id="symmetric-relayed"),
        pytest.param({"nat": "blocked"}, {"relay"}, id="blocked-relayed"),
    ],
    indirect=["lab"],
)
def test_nodes_connect_on_the_path_the_nat_allows(lab: Lab, tmp_path: Path, paths: set[str]) -> None:
    pair = LabPair(lab, tmp_path)
    try:
        ready = pair.ready["client"]["candidates"]
        assert sum(" typ relay" in c for c in ready) == 2, ready  # one allocation per relay

        # client -> gateway; the first echo request sets the connection up and is delivered
        r = lab.exec("client", ["ping", "-n", "-c", "3", "-i", "0.2", "-w", "15", GATEWAY_TUN_IP],
                     check=False, timeout=30)
        assert r.returncode == 0 and " 3 received" in r.stdout, r.stdout + r.stderr
        c_ev = pair.client.wait_event(_established, 5)
        g_ev = pair.gateway.wait_event(_established, 5)
        # ICE may first nominate a relay pair and switch once a direct check succeeds (a check that
        # reaches a NAT before the other side opened the mapping is retried 250 ms later).
        for peer, ev in ((pair.client, c_ev), (pair.gateway, g_ev)):
            if ev["path"] not in paths:
                moved = peer.wait_event(
                    lambda e: e.get("event") == "path_changed" and e.get("path") in paths, 10)
                assert moved["path"] in paths, moved
        assert f"connected {c_ev['path']} {c_ev['rtt']}" in pair.client.lines

        # gateway -> client over the same connection
        r = lab.exec("gateway-1", ["ping", "-n", "-c", "3", "-i", "0.2", "-w", "10", CLIENT_TUN_IP],
                     check=False, timeout=30)
        assert r.returncode == 0 and " 3 received" in r.stdout, r.stdout + r.stderr

        # TCP through the tunnel: the lab's HTTP server on the gateway's tunnel address
        httpd = lab.popen("gateway-1", [sys.executable, "-m", "firezone.lab.httpd",
                                        "--ports", str(HTTP_PORT)],
                          name="httpd-tunnel", env={"PYTHONPATH": str(REPO)})
        _wait_tcp(lab, "gateway-1", HTTP_PORT, httpd)
        body, headers = tmp_path / "body", tmp_path / "headers"
        lab.exec("client", ["curl", "-sS", "--fail", "--max-time", "90", "-D", str(headers),
                            "-o", str(body),
                            f"http://{GATEWAY_TUN_IP}:{HTTP_PORT}/bytes/{TRANSFER_BYTES}"],
                 timeout=100)
        data = body.read_bytes()
        assert len(data) == TRANSFER_BYTES
        digest = hashlib.sha256(data).hexdigest()
        assert digest == hashlib.sha256(payload(TRANSFER_BYTES)).hexdigest()
        assert f"x-sha256: {digest}" in headers.read_text().lower()

        # ICE may still switch to a better pair of the same kind (e.g. the other relay), never
        # to a kind the NAT does not allow, and the connection never failed
        for p in (pair.client, pair.gateway):
            assert not [e for e in p.events if e["event"] == "failed"], p.events
            assert all(e["path"] in paths for e in p.events if e["event"] == "path_changed")
        pair.client.send({"cmd": "stats"})
        stats = pair.client.wait_event(lambda e: e["event"] == "stats", 5)
        assert stats["conn"]["path"] in paths, stats
        assert stats["conn"]["rx_bytes"] >= TRANSFER_BYTES, stats

        # idle: the one timer follows poll_timeout() and does not spin
        pids = [p.proc.pid for p in (pair.client, pair.gateway)]
        before = [_cpu_seconds(pid) for pid in pids]
        time.sleep(2.0)
        used = [_cpu_seconds(pid) - b for pid, b in zip(pids, before)]
        assert max(used) < 0.3, f"node processes used {used} s CPU in 2 s idle"
    finally:
        pair.close()
    for log_path in [pair.client.err_path, pair.gateway.err_path, *lab.log_dir.glob("relay-*.log")]:
        text = Path(log_path).read_text(errors="replace")
        assert "Traceback" not in text and '"level": "ERROR"' not in text, f"{log_path}:\n{text[-3000:]}"
