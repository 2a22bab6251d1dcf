"""`fz relay run` against coturn's client tools (turnutils_stunclient, _uclient, _peer) on loopback."""

from __future__ import annotations

import re
import signal
import stat
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from firezone.proto.turn import credentials as creds
from tests.interop import relay_harness as h

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

MESSAGES = 10_000
CLIENTS = 10


class Relay:
    def __init__(self, proc: h.Proc, secret_file: Path, port: int, health: int,
                 relay_ports: tuple[int, int]):
        self.proc, self.secret_file, self.port, self.health = proc, secret_file, port, health
        self.relay_ports = relay_ports

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def wait_metric(self, name: str, labels: str, at_least: float, timeout: float = 5.0) -> float:
        """Workers report once a second: poll until the metric reaches ``at_least``."""
        deadline = time.monotonic() + timeout
        while True:
            v = self.metric(name, labels)
            if v >= at_least or time.monotonic() > deadline:
                return v
            time.sleep(0.2)

    def metric(self, name: str, labels: str = "") -> float:
        _, text = self.get("/metrics")
        pat = re.compile(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", re.MULTILINE)
        m = pat.search(text)
        assert m, f"{name}{labels} not in /metrics:\n{text}"
        return float(m.group(1))


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = h.tmpdir("fzt")
    yield d


@pytest.fixture(params=[1, 2], ids=["1worker", "2workers"])
def relay(request: pytest.FixtureRequest, workdir: Path) -> Iterator[Relay]:
    port = h.free_udp_port()
    health = h.free_tcp_port()
    relay_ports = h.port_block(200)
    proc, secret_file = h.fz_relay(workdir, listen=[f"127.0.0.1:{port}", f"[::1]:{port}"],
                                   relay_ports=relay_ports, health=f"127.0.0.1:{health}",
                                   extra=["--workers", str(request.param)])
    try:
        h.wait_udp_stun("127.0.0.1", port)
        r = Relay(proc, secret_file, port, health, relay_ports)
        deadline = time.monotonic() + 15
        while r.get("/readyz")[0] != 200:
            assert time.monotonic() < deadline, "relay never became ready"
            time.sleep(0.1)
        yield r
    finally:
        rc = proc.stop()
        log = proc.output()
        assert "Traceback" not in log, log
        assert rc == 0, log


def test_stunclient_ipv4_and_ipv6(relay: Relay) -> None:
    for host in ("127.0.0.1", "::1"):
        out = subprocess.run([h.need("turnutils_stunclient"), "-p", str(relay.port), host],
                             capture_output=True, text=True, timeout=30, check=False)
        assert out.returncode == 0, out.stdout + out.stderr
        fam = "IPv6" if ":" in host else "IPv4"
        assert re.search(rf"{fam}\. UDP reflexive addr: \[?{re.escape(host)}\]?:\d+", out.stdout), out.stdout


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
@pytest.mark.parametrize("mode", ["channel", "send"])
def test_uclient_relays_10k_messages_without_loss(relay: Relay, workdir: Path, family: str,
                                                  mode: str) -> None:
    host = "127.0.0.1" if family == "ipv4" else "::1"
    peer_port = h.free_udp_port(host)
    peer = h.turn_peer(workdir, host, peer_port)
    try:
        user, password = h.fz_credentials(relay.secret_file)
        before = relay.metric("fz_relay_packets_relayed_total", '{direction="peer_to_client"}')
        args = ["-m", str(CLIENTS), "-n", str(MESSAGES // CLIENTS), "-l", "100", "-z", "2", "-c",
                "-u", user, "-w", password, "-e", host, "-r", str(peer_port), "-p", str(relay.port)]
        args += ["-x"] if family == "ipv6" else ["-X"]
        if mode == "send":
            args.append("-s")
        res = h.uclient(args, host, timeout=120)
        assert res.returncode == 0, res.output[-3000:]
        assert res.sent == MESSAGES, res.output[-3000:]
        assert res.received == MESSAGES, res.output[-3000:]
        assert res.lost == 0 and res.lost_pct == 0.0, res.output[-3000:]
        after = relay.wait_metric("fz_relay_packets_relayed_total", '{direction="peer_to_client"}',
                                  before + MESSAGES)
        assert after - before >= MESSAGES
    finally:
        peer.stop()
    assert "Traceback" not in relay.proc.output()


def test_wrong_password_refused_and_counted(relay: Relay, workdir: Path) -> None:
    user, password = h.fz_credentials(relay.secret_file)
    peer_port = h.free_udp_port()
    before = relay.metric("fz_relay_auth_failures_total")
    res = h.uclient(["-n", "3", "-c", "-u", user, "-w", password + "x", "-e", "127.0.0.1",
                     "-r", str(peer_port), "-p", str(relay.port)], "127.0.0.1", timeout=60)
    assert res.returncode != 0
    assert res.received in (None, 0)
    assert relay.wait_metric("fz_relay_auth_failures_total", "", before + 1) > before


def test_expired_username_refused(relay: Relay) -> None:
    secret = bytes.fromhex(relay.secret_file.read_text().strip())
    user, password = creds.make_credentials(secret, "a" * 43 + "=", int(time.time()) - 60)
    peer_port = h.free_udp_port()
    res = h.uclient(["-n", "3", "-c", "-u", user, "-w", password, "-e", "127.0.0.1",
                     "-r", str(peer_port), "-p", str(relay.port)], "127.0.0.1", timeout=60)
    assert res.returncode != 0
    assert res.received in (None, 0)


def test_health_ready_and_metrics(relay: Relay) -> None:
    assert relay.get("/healthz") == (200, "ok\n")
    assert relay.get("/readyz") == (200, "ready\n")
    status, text = relay.get("/metrics")
    assert status == 200
    for name in ("fz_relay_up 1.0", "fz_relay_workers ", "fz_relay_allocations ", "fz_relay_channels ",
                 'fz_relay_packets_relayed_total{direction="client_to_peer"}',
                 'fz_relay_bytes_relayed_total{direction="peer_to_client"}',
                 "fz_relay_auth_failures_total "):
        assert name in text, text
    assert relay.get("/nope")[0] == 404


def test_secret_file_created_0600(relay: Relay) -> None:
    assert stat.S_IMODE(relay.secret_file.stat().st_mode) == 0o600
    assert re.fullmatch(r"[0-9a-f]{64}\n", relay.secret_file.read_text())


def test_sigterm_shuts_down_gracefully(workdir: Path) -> None:
    port = h.free_udp_port()
    proc, _ = h.fz_relay(workdir, listen=[f"127.0.0.1:{port}"], relay_ports=h.port_block(200))
    try:
        h.wait_udp_stun("127.0.0.1", port)
        t0 = time.monotonic()
        rc = proc.stop(signal.SIGTERM, timeout=10)
        assert rc == 0, proc.output()
        assert time.monotonic() - t0 < 5
        assert "relay stopped" in proc.output()
    finally:
        proc.stop(signal.SIGKILL)


def test_port_in_use_is_one_line(workdir: Path) -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        out = subprocess.run([h.FZ, "relay", "run", "--secret-file", str(workdir / "s"),
                              "--listen", f"127.0.0.1:{port}"],
                             capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 1
    lines = [line for line in out.stderr.splitlines() if line.startswith("fz: error:")]
    assert len(lines) == 1 and "cannot listen on 127.0.0.1" in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_control_side_gates_serving_and_is_left_first() -> None:
    """A pluggable control side: no service before join() returns; leave() runs before close."""
    import asyncio
    import socket as socket_mod

    import uvloop

    from firezone.roles import relay as role

    events: list[str] = []

    class GatedControl(role.Control):
        def __init__(self) -> None:
            self.accept = asyncio.Event()

        async def join(self, secret: bytes) -> None:
            events.append("join")
            await self.accept.wait()
            events.append("accepted")

        async def leave(self) -> None:
            assert relay_obj is not None
            events.append(f"leave open={bool(relay_obj.driver.listen_socks)}")

    def stun_answered(port: int) -> bool:
        try:
            h.wait_udp_stun("127.0.0.1", port, timeout=0.5)
            return True
        except TimeoutError:
            return False

    async def main() -> None:
        nonlocal relay_obj
        health_port = h.free_tcp_port()
        udp_port = h.free_udp_port()
        cfg = role.RelayConfig(listen=[("127.0.0.1", udp_port)], relay_ports=h.port_block(200),
                               health_listen=("127.0.0.1", health_port), allow_loopback_peers=True)
        control = GatedControl()
        relay_obj = role.Relay(cfg, role.new_secret(), control)
        task = asyncio.ensure_future(relay_obj.run())
        r = Relay(None, Path("/nonexistent"), udp_port, health_port, cfg.relay_ports)  # type: ignore[arg-type]
        for _ in range(50):
            if events:
                break
            await asyncio.sleep(0.05)
        assert events == ["join"]
        status = await asyncio.to_thread(r.get, "/readyz")
        assert status == (503, "not ready\n")
        assert not await asyncio.to_thread(stun_answered, udp_port)
        control.accept.set()
        for _ in range(50):
            if relay_obj.serving:
                break
            await asyncio.sleep(0.05)
        assert await asyncio.to_thread(r.get, "/readyz") == (200, "ready\n")
        assert await asyncio.to_thread(stun_answered, udp_port)
        relay_obj.request_stop()
        await asyncio.wait_for(task, 10)
        assert events == ["join", "accepted", "leave open=True"]
        with socket_mod.socket(socket_mod.AF_INET, socket_mod.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", udp_port))  # the listening socket is gone

    relay_obj: role.Relay | None = None
    uvloop.run(main())
