"""`fz relay run` under a real portal: join, presence, portal-derived credentials accepted, leave."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from firezone.proto.rng import SeededRng
from firezone.proto.turn.client import Allocation, AllocationReady
from tests.cli.conftest import FZ, free_port
from tests.control.conftest import ControlPortal, Peer

pytestmark = pytest.mark.timeout(120)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def relays_listed(cp: ControlPortal) -> list[dict]:
    out = subprocess.run([*FZ, "--json", "relay", "list"], env=cp.env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout))


def allocate(relay: tuple[str, int], username: str, password: str) -> AllocationReady:
    """A real TURN allocation over UDP with credentials the portal handed out."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    start = time.monotonic()
    alloc = Allocation(server=relay, username=username, password=password, rng=SeededRng(3), now=0.0)
    try:
        while time.monotonic() - start < 10:
            now = time.monotonic() - start
            alloc.handle_timeout(now)
            while (t := alloc.poll_transmit()) is not None:
                sock.sendto(t.payload, t.dst)
            while (ev := alloc.poll_event()) is not None:
                if isinstance(ev, AllocationReady):
                    return ev
                raise AssertionError(f"allocation failed: {ev}")
            try:
                data, src = sock.recvfrom(2048)
            except TimeoutError:
                continue
            alloc.handle_input(data, src, time.monotonic() - start)
    finally:
        sock.close()
    raise AssertionError("no allocation within 10 s")


def test_relay_joins_portal_and_serves_portal_credentials(control_portal: ControlPortal, tmp_path: Path) -> None:
    api = control_portal.admin()
    relay_token = api.ok("POST", "/tokens", {"type": "relay"}, status=201)["secret"]
    api.ok("POST", "/users", {"email": "carol@acme.test"}, status=201)
    client_token = api.ok("POST", "/tokens", {"type": "client", "user": "carol@acme.test"}, status=201)["secret"]
    port = free_udp_port()
    health = free_port()
    log = (tmp_path / "relay.log").open("wb")
    relay = subprocess.Popen([*FZ, "--portal", control_portal.url, "relay", "run", "--token", relay_token,
                              "--listen", f"127.0.0.1:{port}", "--health-listen", f"127.0.0.1:{health}",
                              "--allow-loopback-peers", "--relay-ports", "50000-50100"],
                             env=control_portal.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not relays_listed(control_portal):
            assert relay.poll() is None, (tmp_path / "relay.log").read_text()
            assert time.monotonic() < deadline, "relay never showed up at the portal"
            time.sleep(0.3)
        (listed,) = relays_listed(control_portal)
        assert listed["ipv4"] == "127.0.0.1" and listed["port"] == port

        async def client_gets_relay() -> dict:
            c = Peer(control_portal, "client", client_token)
            await c.connect()
            init = await c.join()
            await c.close()
            return init

        init = asyncio.run(client_gets_relay())
        (r,) = init["relays"]
        assert r["id"] == listed["id"] and r["addr"] == f"127.0.0.1:{port}"
        ready = allocate(("127.0.0.1", port), r["username"], r["password"])
        assert ready.relayed_addrs
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(timeout=15) == 0
        deadline = time.monotonic() + 10
        while relays_listed(control_portal):
            assert time.monotonic() < deadline, "relay still listed after it stopped"
            time.sleep(0.3)
    finally:
        if relay.poll() is None:
            relay.kill()
            relay.wait()
        log.close()
    text = (tmp_path / "relay.log").read_text()
    assert "Traceback" not in text, text


def test_relay_with_a_bad_token_stops_with_one_line(control_portal: ControlPortal) -> None:
    out = subprocess.run([*FZ, "--portal", control_portal.url, "relay", "run", "--token", "not-a-token",
                          "--listen", f"127.0.0.1:{free_udp_port()}"], env=control_portal.env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert "refused" in out.stderr and "401" in out.stderr and "Traceback" not in out.stderr
