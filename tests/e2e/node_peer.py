"""One node in a lab namespace: a TUN with a tunnel IP, a NodeDriver, relays, one peer at a time.

``python -m tests.e2e.node_peer --config JSON`` (a JSON object, or ``@FILE``). The test plays the
portal's signalling role through the pipes. Config keys::

    role          "client" (controlling ICE, forces the handshake) or "gateway"
    private_key   base64 WireGuard key
    tun           interface name;  tun_ip: our tunnel IPv4;  peer_tun_ip: routed into the TUN
    local_ips     interface addresses the sockets are seen on (host candidates)
    port          UDP port (default 52625)
    relays        [{"id", "addr": [ip, port], "username", "password"}]
    peer          optional: a connection to create at once (same object as in "connect")

stdin, one JSON object a line::

    {"cmd": "connect", "peer": {"id", "public_key", "psk", "local_creds": [ufrag, pwd],
                                "remote_creds": [ufrag, pwd]}}
    {"cmd": "candidate", "peer_id": ID, "sdp": SDP}   (a remote candidate)
    {"cmd": "remove", "peer_id": ID}
    {"cmd": "stats"}

stdout: JSON lines ``{"event": ...}`` (``ready`` once every relay has a candidate, ``candidate``,
``invalidate``, ``first_packet`` (client: a TUN packet while no connection exists; the packet is
held until "connect"), ``established``, ``first_reply`` (the first packet from the peer after
``first_packet``), ``failed``, ``closed``, ``stats``) and, on each established connection, the
plain line ``connected <path> <rtt>``. Times (``t``) are CLOCK_MONOTONIC seconds. EOF on stdin
stops the program.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ipaddress
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from firezone.logs import setup_logging
from firezone.proto.node import (
    ConnectionClosed,
    ConnectionEstablished,
    ConnectionFailed,
    InvalidateIceCandidate,
    NewIceCandidate,
    Node,
    NodeEvent,
    PathChanged,
    RelayInfo,
)
from firezone.runtime import driver, netlink, tun
from firezone.runtime.node_driver import NodeDriver
from firezone.runtime.rng import SYSTEM_RNG

log = logging.getLogger("tests.e2e.node_peer")

READY_TIMEOUT = 8.0
# As firezone.roles.wg: the default queue of 500 overflows under one TCP stream on 2 cores.
TUN_TXQUEUELEN = 3000
MAX_PENDING = 128


def _emit(obj: dict[str, Any] | str) -> None:
    line = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Peer:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.is_client = cfg["role"] == "client"
        self.peer_id: str | None = None
        self.pending: list[bytes] = []
        self.first_packet_at: float | None = None
        self.replied = False
        self.done = asyncio.Event()
        loop = asyncio.get_running_loop()
        self.node = Node(private_key=base64.b64decode(cfg["private_key"]), rng=SYSTEM_RNG,
                         now=loop.time(), unix_time=time.time(), is_client=self.is_client)
        self.tun_fd: int | None = None
        self.driver: NodeDriver | None = None
        self.peer_ip = ipaddress.IPv4Address(cfg["peer_tun_ip"]).packed

    async def start(self) -> None:
        cfg = self.cfg
        fd, name = tun.open_tun(cfg["tun"])
        self.tun_fd = fd
        await netlink.aconfigure_interface(
            name, mtu=tun.DEFAULT_MTU,
            addresses=[ipaddress.ip_interface(cfg["tun_ip"] + "/32")],
            routes=[ipaddress.ip_network(cfg["peer_tun_ip"] + "/32")],
            txqueuelen=TUN_TXQUEUELEN)
        self.driver = NodeDriver(self.node, tun_fd=fd, local_ips=cfg["local_ips"],
                                 route=self.route, on_event=self.on_event,
                                 port=cfg.get("port", 52625), on_tun_write=self.on_tun_write)
        self.driver.start()
        now = self.driver.now()
        relays = [RelayInfo(r["id"], (r["addr"][0], int(r["addr"][1])), r["username"], r["password"])
                  for r in cfg.get("relays", [])]
        self.node.update_relays(relays, now)
        if cfg.get("peer"):
            self.connect(cfg["peer"])
        self.driver.wake()

    async def wait_ready(self) -> None:
        want = len(self.cfg.get("relays", []))
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            cands = self.node.local_candidates
            if sum(c.kind == "relay" for c in cands) >= want or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        _emit({"event": "ready", "candidates": [c.to_sdp() for c in cands]})

    def close(self) -> None:
        if self.driver is not None:
            self.driver.close()
        if self.tun_fd is not None:
            os.close(self.tun_fd)
            self.tun_fd = None

    # -- node callbacks --------------------------------------------------------------------

    def route(self, packet: bytes) -> str | None:
        # Only IPv4 packets for the peer's tunnel address (the kernel also sends IPv6 router
        # solicitations and the like into a fresh TUN).
        if len(packet) < 20 or packet[0] >> 4 != 4 or packet[16:20] != self.peer_ip:
            return None
        if self.peer_id is not None:
            return self.peer_id
        if self.is_client:
            if self.first_packet_at is None:
                self.first_packet_at = time.monotonic()
                self.replied = False
                _emit({"event": "first_packet", "t": self.first_packet_at})
            if len(self.pending) < MAX_PENDING:
                self.pending.append(packet)
        return None

    def on_tun_write(self, peer_id: str, packet: bytes) -> None:
        if packet and self.first_packet_at is not None and not self.replied:
            self.replied = True
            _emit({"event": "first_reply", "peer_id": peer_id, "t": time.monotonic(),
                   "since_first_packet": time.monotonic() - self.first_packet_at})

    def on_event(self, ev: NodeEvent) -> None:
        match ev:
            case NewIceCandidate(peer_id=pid, sdp=sdp):
                _emit({"event": "candidate", "peer_id": pid, "sdp": sdp})
            case InvalidateIceCandidate(peer_id=pid, sdp=sdp):
                _emit({"event": "invalidate", "peer_id": pid, "sdp": sdp})
            case ConnectionEstablished(peer_id=pid, path=path, rtt=rtt):
                t = time.monotonic()
                since = t - self.first_packet_at if self.first_packet_at is not None else None
                _emit({"event": "established", "peer_id": pid, "path": path, "rtt": rtt, "t": t,
                       "since_first_packet": since})
                _emit(f"connected {path} {rtt}")
            case PathChanged(peer_id=pid, path=path, rtt=rtt):
                _emit({"event": "path_changed", "peer_id": pid, "path": path, "rtt": rtt})
            case ConnectionFailed(peer_id=pid, reason=reason):
                _emit({"event": "failed", "peer_id": pid, "reason": reason})
                if pid == self.peer_id:
                    self.peer_id = None
            case ConnectionClosed(peer_id=pid):
                _emit({"event": "closed", "peer_id": pid})

    # -- signalling ------------------------------------------------------------------------

    def connect(self, peer: dict[str, Any]) -> None:
        assert self.driver is not None
        now = self.driver.now()
        psk = base64.b64decode(peer["psk"]) if peer.get("psk") else None
        self.node.upsert_connection(
            peer["id"], peer_public_key=base64.b64decode(peer["public_key"]), preshared_key=psk,
            local_creds=tuple(peer["local_creds"]), remote_creds=tuple(peer["remote_creds"]),
            now=now)
        self.peer_id = peer["id"]
        pending, self.pending = self.pending, []
        for pkt in pending:
            # No path yet: the node buffers these until ICE selects one.
            self.node.encapsulate(peer["id"], pkt, now)

    def handle_command(self, msg: dict[str, Any]) -> None:
        assert self.driver is not None
        now = self.driver.now()
        match msg.get("cmd"):
            case "connect":
                self.connect(msg["peer"])
            case "candidate":
                self.node.add_remote_candidate(msg["peer_id"], msg["sdp"], now)
            case "invalidate":
                self.node.remove_remote_candidate(msg["peer_id"], msg["sdp"], now)
            case "remove":
                self.node.remove_connection(msg["peer_id"], now)
                if self.peer_id == msg["peer_id"]:
                    self.peer_id = None
                self.first_packet_at = None
                self.pending.clear()
            case "stats":
                out: dict[str, Any] = {"event": "stats", "driver": vars(self.driver.stats),
                                       "node": dict(self.node.stats_counters)}
                if self.peer_id is not None and self.peer_id in self.node.connections():
                    out["conn"] = {k: (list(v) if isinstance(v, tuple) else v)
                                   for k, v in self.node.stats(self.peer_id).items()}
                _emit(out)
            case other:
                log.warning("unknown command %r", other)
        self.driver.wake()

    def on_stdin(self, buf: bytearray) -> None:
        try:
            chunk = os.read(sys.stdin.fileno(), 65536)
        except BlockingIOError:
            return
        if not chunk:
            self.done.set()
            return
        buf += chunk
        while (i := buf.find(b"\n")) >= 0:
            line = bytes(buf[:i]).strip()
            del buf[: i + 1]
            if line:
                self.handle_command(json.loads(line))


async def main(cfg: dict[str, Any]) -> int:
    peer = Peer(cfg)
    loop = asyncio.get_running_loop()
    try:
        await peer.start()
        await peer.wait_ready()
        buf = bytearray()
        os.set_blocking(sys.stdin.fileno(), False)
        loop.add_reader(sys.stdin.fileno(), peer.on_stdin, buf)
        stop = asyncio.ensure_future(driver.wait_for_signals())
        done = asyncio.ensure_future(peer.done.wait())
        await asyncio.wait([stop, done], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        done.cancel()
        loop.remove_reader(sys.stdin.fileno())
    finally:
        peer.close()
    return 0


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.e2e.node_peer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="JSON object, or @FILE")
    ap.add_argument("-v", "--verbose", action="count", default=0, help="log to stderr (-vv: trace)")
    args = ap.parse_args(argv)
    text = Path(args.config[1:]).read_text() if args.config.startswith("@") else args.config
    setup_logging(args.verbose, stream=sys.stderr)
    return driver.run(main(json.loads(text)))


# --- driving two node_peer processes from a test or benchmark ------------------------------------

TUN_NAME = "tun-fz"
CLIENT_TUN_IP = "100.64.0.1"
GATEWAY_TUN_IP = "100.64.0.2"
RELAY_PORT = 3478
REPO = Path(__file__).resolve().parents[2]


def _verbosity() -> list[str]:
    """``FZ_NODE_PEER_DEBUG=1`` (debug) or ``2`` (trace) makes the node processes log to their
    ``<lab logs>/<node>.node_peer.log``."""
    n = os.environ.get("FZ_NODE_PEER_DEBUG", "")
    return ["-" + "v" * int(n)] if n.isdigit() and int(n) > 0 else []


class PeerProcess:
    """A node_peer process in a lab node; a reader thread collects its events."""

    def __init__(self, lab: Any, node: str, cfg: dict[str, Any], on_event: Any) -> None:
        import subprocess
        import threading

        self.node = node
        self.events: list[dict[str, Any]] = []
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._wlock = threading.Lock()
        self._on_event = on_event
        self.err_path = Path(lab.log_dir) / f"{node}.node_peer.log"
        self._err = open(self.err_path, "ab")  # noqa: SIM115 - closed in close()
        self.proc = lab.popen(node, [sys.executable, "-m", "tests.e2e.node_peer", "--config",
                                     json.dumps(cfg), *_verbosity()],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=self._err,
                              name="node_peer", env={"PYTHONPATH": str(REPO)})
        self._thread = threading.Thread(target=self._read, daemon=True, name=f"read-{node}")
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            ev: dict[str, Any] | None = None
            if line.startswith("{"):
                try:
                    ev = json.loads(line)
                except ValueError:
                    ev = None
            with self._cond:
                self.lines.append(line)
                if ev is not None:
                    self.events.append(ev)
                self._cond.notify_all()
            if ev is not None:
                self._on_event(self, ev)
        with self._cond:
            self._cond.notify_all()

    def send(self, msg: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        with self._wlock:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()

    def wait_event(self, pred: Any, timeout: float, start: int = 0) -> dict[str, Any]:
        """The first event from index ``start`` on that satisfies ``pred``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for ev in self.events[start:]:
                    if pred(ev):
                        return ev
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(
                        f"node_peer in {self.node}: no matching event within {timeout} s "
                        f"(exit {self.proc.poll()}); output: {self.lines[-30:]!r}")
                self._cond.wait(min(left, 0.2))

    def close(self, lab: Any) -> None:
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        import subprocess

        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            lab.stop(self.proc)
        self._thread.join(timeout=5)
        self._err.close()


class LabPair:
    """Relays in the lab, a client node and a gateway node; the harness relays the signalling.

    A packet the client reads from its TUN while it has no connection is its "first packet": the
    harness (as the portal would) creates the connection on the gateway, then on the client, with
    fresh ICE credentials and a fresh preshared key, and forwards candidates both ways.
    """

    def __init__(self, lab: Any, workdir: Path, *, relays: tuple[str, ...] = ("relay-1", "relay-2"),
                 gateway: str = "gateway-1") -> None:
        import secrets
        import subprocess
        import threading

        from firezone.proto.wireguard.keys import b64encode_key, generate_private_key, public_key

        self.lab = lab
        self.workdir = workdir
        self._lock = threading.Lock()
        self._seq = 0
        self._secrets = secrets
        self.relay_procs = []
        for r in relays:
            secret = workdir / f"{r}.secret"
            ip = lab.addr(r, 4)
            self.relay_procs.append(lab.popen(r, [sys.executable, "-m", "firezone", "relay", "run",
                                                  "--listen", f"{ip}:{RELAY_PORT}",
                                                  "--secret-file", str(secret)], name="relay"))
        for r, proc in zip(relays, self.relay_procs):
            self._wait_udp(r, RELAY_PORT, proc)
        keys = {}
        for role in ("client", "gateway"):
            priv = generate_private_key(SYSTEM_RNG)
            keys[role] = (b64encode_key(priv), b64encode_key(public_key(priv)))
        self.keys = keys

        def relay_list(pub: str) -> list[dict[str, Any]]:
            out = []
            for r in relays:
                c = json.loads(subprocess.run(
                    [sys.executable, "-m", "firezone", "relay", "credentials", "--secret-file",
                     str(workdir / f"{r}.secret"), "--public-key", pub, "--json"],
                    capture_output=True, text=True, check=True).stdout)
                out.append({"id": r, "addr": [lab.addr(r, 4), RELAY_PORT],
                            "username": c["username"], "password": c["password"]})
            return out

        base = {"tun": TUN_NAME}
        self.client = PeerProcess(lab, "client", {
            **base, "role": "client", "private_key": keys["client"][0], "tun_ip": CLIENT_TUN_IP,
            "peer_tun_ip": GATEWAY_TUN_IP, "local_ips": [lab.addr("client", 4)],
            "relays": relay_list(keys["client"][1])}, self._on_event)
        self.gateway = PeerProcess(lab, gateway, {
            **base, "role": "gateway", "private_key": keys["gateway"][0], "tun_ip": GATEWAY_TUN_IP,
            "peer_tun_ip": CLIENT_TUN_IP, "local_ips": [lab.addr(gateway, 4)],
            "relays": relay_list(keys["gateway"][1])}, self._on_event)
        self.ready = {p.node: p.wait_event(lambda e: e["event"] == "ready", 15)
                      for p in (self.client, self.gateway)}
        self.peer_id: str | None = None

    def _wait_udp(self, node: str, port: int, proc: Any, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"relay in {node} exited ({proc.returncode}); log "
                                     f"{getattr(proc, 'log_path', None)}")
            out = self.lab.exec(node, ["ss", "-Hlun"]).stdout
            if f":{port} " in out:
                return
            time.sleep(0.05)
        raise AssertionError(f"relay in {node} not listening on UDP {port} after {timeout} s")

    def _other(self, p: PeerProcess) -> PeerProcess:
        return self.gateway if p is self.client else self.client

    def _on_event(self, p: PeerProcess, ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        if kind in ("candidate", "invalidate"):
            with self._lock:
                if ev["peer_id"] == self.peer_id:
                    self._other(p).send({"cmd": kind, "peer_id": ev["peer_id"], "sdp": ev["sdp"]})
        elif kind == "first_packet" and p is self.client:
            self.connect()

    def connect(self) -> str:
        """Create a new connection on both sides (gateway first, as the portal does)."""
        s = self._secrets
        with self._lock:
            self._seq += 1
            pid = f"conn-{self._seq}"
            self.peer_id = pid
            c_creds = [s.token_hex(4), s.token_hex(12)]
            g_creds = [s.token_hex(4), s.token_hex(12)]
            psk = base64.b64encode(s.token_bytes(32)).decode()
            self.gateway.send({"cmd": "connect", "peer": {
                "id": pid, "public_key": self.keys["client"][1], "psk": psk,
                "local_creds": g_creds, "remote_creds": c_creds}})
            self.client.send({"cmd": "connect", "peer": {
                "id": pid, "public_key": self.keys["gateway"][1], "psk": psk,
                "local_creds": c_creds, "remote_creds": g_creds}})
        return pid

    def disconnect(self, timeout: float = 5.0) -> None:
        """Remove the connection on both sides and wait until both report it closed."""
        with self._lock:
            pid, self.peer_id = self.peer_id, None
        if pid is None:
            return
        marks = [len(self.client.events), len(self.gateway.events)]
        for p in (self.client, self.gateway):
            p.send({"cmd": "remove", "peer_id": pid})
        for p, m in zip((self.client, self.gateway), marks):
            p.wait_event(lambda e: e["event"] in ("closed", "failed") and e["peer_id"] == pid,
                         timeout, start=m)

    def close(self) -> None:
        for p in (self.client, self.gateway):
            p.close(self.lab)
        for proc in self.relay_procs:
            if proc.poll() is None:
                self.lab.stop(proc)


if __name__ == "__main__":
    sys.exit(cli())
