"""The relay role: a TURN server core, its UDP driver, a health server and a control side.

Lifecycle (``Relay.run``)::

    health server up (/readyz 503)
      -> control.join(secret)         the control side accepts us (portal ``init``, or at once)
      -> sockets bound, serving       (/readyz 200)
      -> stop requested (SIGTERM/SIGINT or control.run() ends)
      -> control.leave()              say goodbye before the sockets go away
      -> sockets closed, health server down

The control side is pluggable (:class:`Control`): :class:`StaticControl` serves a secret read from a
file; a portal control (joining the portal's ``/relay`` WebSocket with the random secret) plugs in
through the same three methods.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firezone.metrics import MetricSpec, new_registry
from firezone.proto.rng import Rng
from firezone.runtime.health import HealthServer
from firezone.runtime.rng import SYSTEM_RNG

log = logging.getLogger(__name__)

SECRET_BYTES = 32
DEFAULT_PORT = 3478
DEFAULT_RELAY_PORTS = (49152, 65535)


class RelayError(Exception):
    """A relay start-up problem worth one line to the operator (bad file, port in use...)."""


# ---------------------------------------------------------------------------- secrets


def new_secret(rng: Rng = SYSTEM_RNG) -> bytes:
    """A fresh random relay secret (portal mode draws one at every start)."""
    return rng.token_bytes(SECRET_BYTES)


def encode_secret(secret: bytes) -> str:
    """The text form of a relay secret: lowercase hex (what credentials.secret_text hashes)."""
    from firezone.proto.turn.credentials import secret_text

    return secret_text(secret)


def decode_secret(text: str) -> bytes:
    """Parse the hex text form of a relay secret; raises ValueError."""
    text = text.strip()
    if len(text) < 32:
        raise ValueError("expected at least 32 hex digits")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise ValueError("expected hex digits") from None


def read_secret_file(path: Path) -> bytes:
    try:
        text = path.read_text()
    except OSError as e:
        raise RelayError(f"{path}: cannot read secret file: {e.strerror}") from None
    try:
        secret = decode_secret(text)
    except ValueError as e:
        raise RelayError(f"{path}: not a relay secret: {e}") from None
    if not secret:
        raise RelayError(f"{path}: the secret file is empty")
    return secret


def load_or_create_secret(path: Path, rng: Rng = SYSTEM_RNG) -> tuple[bytes, bool]:
    """Read the secret in ``path``, or create the file (mode 0600) with a new random one.

    Returns ``(secret, created)``.
    """
    if path.exists():
        return read_secret_file(path), False
    secret = new_secret(rng)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # lost a race with another process: use theirs
        return read_secret_file(path), False
    except OSError as e:
        raise RelayError(f"{path}: cannot create secret file: {e.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(encode_secret(secret) + "\n")
    return secret, True


# ---------------------------------------------------------------------------- control side


class Control:
    """The relay's control side: who accepts the relay and learns its secret."""

    async def join(self, secret: bytes) -> None:
        """Return once the control side accepts the relay (raise to refuse)."""

    async def run(self) -> None:
        """Keep the control session alive; returning stops the relay. Default: forever."""
        await asyncio.Event().wait()

    async def leave(self) -> None:
        """Leave the control side; called first on shutdown."""


class StaticControl(Control):
    """No portal: the relay serves at once, with a secret shared out of band (a file)."""


# ---------------------------------------------------------------------------- config


@dataclass
class RelayConfig:
    listen: list[tuple[str, int]] = field(default_factory=lambda: [("0.0.0.0", DEFAULT_PORT),
                                                                    ("::", DEFAULT_PORT)])
    relay_ports: tuple[int, int] = DEFAULT_RELAY_PORTS
    public_ip4: str | None = None
    public_ip6: str | None = None
    health_listen: tuple[str, int] | None = None
    allow_loopback_peers: bool = False
    max_allocations_per_user: int | None = None  # None: the core's default
    reuse_port: bool = False  # SO_REUSEPORT on the listening sockets (several worker processes)


def _is_unspecified(host: str) -> bool:
    return host in ("0.0.0.0", "::", "")


def _route_source(family: int) -> str | None:
    """The local address the kernel would use toward the outside (a UDP connect sends nothing)."""
    target = "2001:db8::1" if family == socket.AF_INET6 else "192.0.2.1"
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((target, 9))
            return str(s.getsockname()[0])
    except OSError:
        return None


def resolve_addresses(cfg: RelayConfig) -> tuple[str | None, str | None, str | None, str | None]:
    """Work out (public_ip4, public_ip6, relay_bind4, relay_bind6) from the listen addresses.

    A family is served only if the relay listens on it. Relayed ports bind to the listen address
    of their family; the public (advertised) address is the flag, else a specific listen address,
    else the address of the default route.
    """
    hosts4 = [h for h, _ in cfg.listen if ":" not in h]
    hosts6 = [h for h, _ in cfg.listen if ":" in h]
    # Replies must leave from the address the client talks to; with one socket per family the
    # driver needs no per-client socket table on the hot path.
    if len(hosts4) > 1 or len(hosts6) > 1:
        raise RelayError("give --listen at most once per address family (one IPv4, one IPv6)")
    out: list[str | None] = []
    for hosts, public, fam in ((hosts4, cfg.public_ip4, socket.AF_INET),
                               (hosts6, cfg.public_ip6, socket.AF_INET6)):
        if not hosts:
            if public is not None:
                raise RelayError(f"--public-ip{4 if fam == socket.AF_INET else 6} given but the "
                                 "relay does not listen on that address family")
            out += [None, None]
            continue
        bind = hosts[0]
        if public is None:
            public = bind if not _is_unspecified(bind) else _route_source(fam)
        out += [public, bind]
    p4, b4, p6, b6 = out
    if p4 is None and p6 is None:
        raise RelayError("no public address: pass --public-ip4 and/or --public-ip6")
    return p4, p6, (b4 if p4 else None), (b6 if p6 else None)


# ---------------------------------------------------------------------------- metrics

_GAUGES = ("allocations", "channels", "permissions")
_COUNTERS = ("packets_client_to_peer", "packets_peer_to_client", "bytes_client_to_peer",
             "bytes_peer_to_client", "auth_failures", "datagrams_in")


def local_snapshot(server: Any, driver: Any) -> dict[str, Any]:
    """Plain counters of one core + driver, as JSON-able data (workers send it to the parent)."""
    out: dict[str, Any] = {k: 0 for k in (*_GAUGES, *_COUNTERS)}
    drops: dict[str, int] = {}
    if server is not None:
        st = server.stats
        for k in (*_GAUGES, *_COUNTERS):
            out[k] = int(getattr(st, k, 0) or 0)
        for k, v in dict(getattr(st, "drops", {}) or {}).items():
            drops[str(k)] = drops.get(str(k), 0) + int(v)
    if driver is not None:
        out["datagrams_in"] = driver.stats.datagrams_in
        for k, v in driver.stats.drops.items():
            drops[k] = drops.get(k, 0) + v
    out["drops"] = drops
    return out


def merge_snapshots(snaps: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {k: 0 for k in (*_GAUGES, *_COUNTERS)}
    drops: dict[str, int] = {}
    for snap in snaps:
        for k in (*_GAUGES, *_COUNTERS):
            total[k] += int(snap.get(k, 0))
        for k, v in snap.get("drops", {}).items():
            drops[k] = drops.get(k, 0) + int(v)
    total["drops"] = drops
    return total


def relay_metric_specs(relay: Relay) -> list[MetricSpec]:
    """Metric families read from the cores' and drivers' counters at scrape time."""

    def field_(name: str) -> Any:
        return lambda: relay.snapshot()[name]

    def direction(prefix: str) -> Any:
        def read() -> dict[str, int]:
            snap = relay.snapshot()
            return {"client_to_peer": snap[f"{prefix}_client_to_peer"],
                    "peer_to_client": snap[f"{prefix}_peer_to_client"]}
        return read

    return [
        MetricSpec("fz_relay_up", "1 while the relay serves (joined its control side)", "gauge",
                   lambda: 1 if relay.serving else 0),
        MetricSpec("fz_relay_workers", "Worker processes serving (this one included)", "gauge",
                   lambda: (1 + len(relay.workers)) if relay.serving else 0),
        MetricSpec("fz_relay_allocations", "Current TURN allocations", "gauge",
                   field_("allocations")),
        MetricSpec("fz_relay_channels", "Current channel bindings", "gauge", field_("channels")),
        MetricSpec("fz_relay_permissions", "Current permissions", "gauge", field_("permissions")),
        MetricSpec("fz_relay_packets_relayed", "Datagrams relayed, by direction", "counter",
                   direction("packets"), labels=("direction",)),
        MetricSpec("fz_relay_bytes_relayed", "Payload bytes relayed, by direction", "counter",
                   direction("bytes"), labels=("direction",)),
        MetricSpec("fz_relay_auth_failures", "Requests refused for bad or stale credentials",
                   "counter", field_("auth_failures")),
        MetricSpec("fz_relay_drops", "Datagrams dropped, by reason", "counter",
                   lambda: relay.snapshot()["drops"], labels=("reason",)),
        MetricSpec("fz_relay_datagrams_received", "Datagrams read from all sockets", "counter",
                   field_("datagrams_in")),
    ]


# ---------------------------------------------------------------------------- worker processes


def split_ports(ports: tuple[int, int], n: int) -> list[tuple[int, int]]:
    """Cut a relayed-port range into ``n`` disjoint slices, one per worker."""
    lo, hi = ports
    size = (hi - lo + 1) // n
    if size < 1:
        raise RelayError(f"--relay-ports {lo}-{hi} is too small for {n} workers")
    return [(lo + i * size, hi if i == n - 1 else lo + (i + 1) * size - 1) for i in range(n)]


class WorkerHandle:
    """A child process running :mod:`firezone.roles.relay_worker` (its own core and sockets).

    The parent writes one JSON line with the worker's settings (the secret included, never on the
    command line) to its stdin and keeps stdin open: EOF tells the worker to stop. The worker
    answers ``{"ready": true}`` once its sockets are bound, then one stats snapshot per second.
    """

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.snapshot: dict[str, Any] = {}
        self._reader: asyncio.Task[None] | None = None
        self.exited = asyncio.Event()

    async def start(self, settings: dict[str, Any], timeout: float = 15.0) -> None:
        import json
        import sys

        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "firezone.roles.relay_worker",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(settings).encode() + b"\n")
        await self.proc.stdin.drain()
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            raise RelayError(f"relay worker {self.index} did not start within {timeout:.0f} s") from None
        msg = json.loads(line) if line.strip() else {"error": "exited before it was ready"}
        if not msg.get("ready"):
            raise RelayError(f"relay worker {self.index}: {msg.get('error', 'failed')}")
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        import json

        assert self.proc is not None and self.proc.stdout is not None
        try:
            while line := await self.proc.stdout.readline():
                try:
                    self.snapshot = json.loads(line)
                except ValueError:
                    continue
        finally:
            self.exited.set()

    async def stop(self, timeout: float = 5.0) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


# ---------------------------------------------------------------------------- the relay


class Relay:
    """One relay: owns the core, the driver, the health server, workers and the control side."""

    def __init__(self, cfg: RelayConfig, secret: bytes, control: Control | None = None,
                 rng: Rng = SYSTEM_RNG, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.cfg = cfg
        self.secret = secret
        self.control = control or StaticControl()
        self.rng = rng
        self.n_workers = workers
        self.server: Any = None
        self.driver: Any = None
        self.health: HealthServer | None = None
        self.workers: list[WorkerHandle] = []
        self.serving = False
        self.bound: list[tuple[str, int]] = []
        self.registry = new_registry(relay_metric_specs(self))
        self._stop = asyncio.Event()

    def request_stop(self) -> None:
        self._stop.set()

    def snapshot(self) -> dict[str, Any]:
        """Counters summed over this process and every worker."""
        return merge_snapshots([local_snapshot(self.server, self.driver),
                                *(w.snapshot for w in self.workers)])

    def worker_settings(self, ports: tuple[int, int], addrs: tuple[Any, ...]) -> dict[str, Any]:
        p4, p6, b4, b6 = addrs
        return {"listen": self.listen_for(p4, p6), "relay_ports": list(ports),
                "public_ip4": p4, "public_ip6": p6, "relay_bind4": b4, "relay_bind6": b6,
                "secret": encode_secret(self.secret),
                "allow_loopback_peers": self.cfg.allow_loopback_peers,
                "max_allocations_per_user": self.cfg.max_allocations_per_user,
                "log_level": logging.getLogger().level}

    def listen_for(self, p4: str | None, p6: str | None) -> list[tuple[str, int]]:
        return [(h, p) for h, p in self.cfg.listen
                if (":" in h and p6 is not None) or (":" not in h and p4 is not None)]

    async def start(self) -> None:
        """Start the health server, join the control side, then bind and serve."""
        addrs = resolve_addresses(self.cfg)
        if self.cfg.health_listen is not None:
            host, port = self.cfg.health_listen
            self.health = HealthServer(host, port, registry=self.registry,
                                       ready=lambda: self.serving)
            try:
                await self.health.start()
            except OSError as e:
                raise RelayError(f"cannot listen for health checks on {host}:{port}: "
                                 f"{e.strerror}") from None
        for fam, public in ((4, addrs[0]), (6, addrs[1])):
            if public is None and any((":" in h) == (fam == 6) for h, _ in self.cfg.listen):
                log.warning("no public address for this family: not relaying over it "
                            "(pass --public-ip%d)", fam, extra={"family": fam})
        await self.control.join(self.secret)
        slices = split_ports(self.cfg.relay_ports, self.n_workers)
        reuse = self.n_workers > 1 or self.cfg.reuse_port
        self.server, self.driver, self.bound = start_core(
            self.cfg, self.secret, addrs, slices[0], self.listen_for(addrs[0], addrs[1]),
            rng=self.rng, reuse_port=reuse)
        for i, ports in enumerate(slices[1:], start=1):
            w = WorkerHandle(i)
            self.workers.append(w)
            await w.start(self.worker_settings(ports, addrs))
        # Everything allocated so far lives for the whole process: keep it out of the cyclic
        # GC's full collections, which would otherwise stall the packet loop periodically.
        gc.freeze()
        self.serving = True
        log.info("relay serving", extra={"sockets": len(self.bound), "workers": self.n_workers,
                                         "relay_ports": "{}-{}".format(*self.cfg.relay_ports)})
        log.debug("relay listening", extra={"listen": _fmt_addrs(self.bound),
                                            "public_ip4": addrs[0], "public_ip6": addrs[1]})

    async def stop(self) -> None:
        """Leave the control side first, then close sockets, workers and the health server."""
        was_serving = self.serving
        self.serving = False
        try:
            await asyncio.wait_for(self.control.leave(), timeout=5)
        except Exception as e:  # noqa: BLE001 - shutdown continues regardless
            log.warning("leaving the control side failed", extra={"error": str(e)})
        if self.driver is not None:
            self.driver.close()
        await asyncio.gather(*(w.stop() for w in self.workers), return_exceptions=True)
        if self.health is not None:
            await self.health.stop()
        if was_serving:
            log.info("relay stopped")

    async def run(self) -> None:
        """Serve until :meth:`request_stop` (or the control side or a worker ends), then stop."""
        try:
            await self.start()
            control_task = asyncio.ensure_future(self.control.run())
            stop_task = asyncio.ensure_future(self._stop.wait())
            worker_tasks = [asyncio.ensure_future(w.exited.wait()) for w in self.workers]
            done, _ = await asyncio.wait({control_task, stop_task, *worker_tasks},
                                         return_when=asyncio.FIRST_COMPLETED)
            for t in (control_task, stop_task, *worker_tasks):
                if t not in done:
                    t.cancel()
            if control_task in done and control_task.exception() is not None:
                raise RelayError(f"control side failed: {control_task.exception()}")
            if stop_task not in done and any(t in done for t in worker_tasks):
                raise RelayError("a relay worker process exited unexpectedly")
        finally:
            await self.stop()


def start_core(cfg: RelayConfig, secret: bytes, addrs: tuple[Any, ...], ports: tuple[int, int],
               listen: list[tuple[str, int]], *, rng: Rng = SYSTEM_RNG,
               reuse_port: bool = False) -> tuple[Any, Any, list[tuple[str, int]]]:
    """Create a TurnServer and its UDP driver on the running loop; return (server, driver, bound)."""
    from firezone.proto.turn.server import TurnServer
    from firezone.runtime.relay_udp import RelayUdpDriver

    loop = asyncio.get_running_loop()
    p4, p6, b4, b6 = addrs
    quota: dict[str, Any] = {}
    if cfg.max_allocations_per_user is not None:
        quota["max_allocations_per_username"] = cfg.max_allocations_per_user
    server = TurnServer(secret=secret, public_ip4=p4, public_ip6=p6, relay_ports=ports, rng=rng,
                        now=loop.time(), unix_time=time.time(),
                        allow_loopback_peers=cfg.allow_loopback_peers, **quota)
    driver = RelayUdpDriver(server, listen=listen, relay_bind4=b4, relay_bind6=b6, loop=loop,
                            reuse_port=reuse_port)
    driver.on_port_unavailable = lambda port, fam: server.port_unavailable(port, fam, loop.time())
    try:
        bound = driver.start()
    except OSError as e:
        raise RelayError(f"cannot listen on {_fmt_addrs(listen)}: {e.strerror}") from None
    return server, driver, bound


def _fmt_addrs(addrs: list[tuple[str, int]]) -> str:
    return ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in addrs)


async def run(cfg: RelayConfig, secret: bytes, control: Control | None = None,
              workers: int = 1) -> None:
    """Run one relay until SIGTERM or SIGINT."""
    relay = Relay(cfg, secret, control, workers=workers)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, relay.request_stop)
    try:
        await relay.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def main(cfg: RelayConfig, secret: bytes, control: Control | None = None, workers: int = 1) -> None:
    """Blocking entry point used by ``fz relay run``: one uvloop event loop."""
    import uvloop

    uvloop.run(run(cfg, secret, control, workers))
