"""Run a :class:`firezone.proto.node.Node` on the event loop: one UDP socket per family + a TUN.

Data path (the shape of :mod:`firezone.roles.wg`): the TUN fd and each UDP socket are registered
with ``loop.add_reader``; every readiness event drains up to ``BATCH`` reads without blocking.

* TUN -> ``route(packet)`` names the peer (None drops the packet) -> ``node.encapsulate`` -> the
  datagram joins a :class:`~firezone.runtime.udp.SendBatcher`;
* socket -> ``node.handle_datagram(local, remote, data)`` -> a decrypted packet is written to the
  TUN; STUN, TURN and handshakes produce transmits that the batch drains.

At the end of every batch the node's transmits are sent, its events are handed to ``on_event``
and the one timer is re-armed at ``node.poll_timeout()``. Code that changes the node from outside
(signalling: ``upsert_connection``, ``add_remote_candidate``, ...) calls :meth:`NodeDriver.wake`
afterwards so the resulting output leaves at once.

The node sees each socket through one local address per family (its host candidate): the
sockets are bound to the wildcard address, so the caller names the interface addresses.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from firezone.logs import TRACE
from firezone.proto.node import DEFAULT_PORT, Node, NodeEvent
from firezone.runtime.driver import DeadlineTimer
from firezone.runtime.udp import SendBatcher, UdpSockets, recv_segments

__all__ = ["BATCH", "DriverStats", "NodeDriver"]

log = logging.getLogger(__name__)

# Packets handled per readiness event before yielding to the other fds and timers.
BATCH = 128
RECV_SIZE = 65535

Addr = tuple[str, int]
RouteFn = Callable[[bytes], "str | None"]
EventFn = Callable[[NodeEvent], None]


@dataclass
class DriverStats:
    tun_rx: int = 0
    tun_tx: int = 0
    tun_tx_drop: int = 0
    tun_unrouted: int = 0
    udp_rx: int = 0
    udp_tx_drop: int = 0


class NodeDriver:
    """Owns the UDP sockets and the timer of one :class:`Node`; reads and writes a TUN fd."""

    def __init__(
        self,
        node: Node,
        *,
        tun_fd: int | None,
        local_ips: Iterable[str],
        route: RouteFn,
        on_event: EventFn,
        port: int = DEFAULT_PORT,
        on_tun_write: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self.node = node
        self.tun_fd = tun_fd
        self.route = route
        self.on_event = on_event
        # Called with (peer_id, packet) before a decrypted packet goes to the TUN (measurements).
        self.on_tun_write = on_tun_write
        self.port = port
        self.stats = DriverStats()
        self._local: dict[int, Addr] = {}
        for ip in local_ips:
            fam = ipaddress.ip_address(ip).version
            if fam in self._local:
                raise ValueError(f"at most one local IPv{fam} address, got {ip}")
            self._local[fam] = (str(ipaddress.ip_address(ip)), 0)
        if not self._local:
            raise ValueError("need at least one local IP address")
        self.udp: UdpSockets | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: DeadlineTimer | None = None
        self._batcher: SendBatcher | None = None
        self._readers: list[int] = []

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Bind the sockets, register the readers, tell the node its interfaces; call on the loop."""
        loop = self._loop = asyncio.get_running_loop()
        try:
            self.udp = UdpSockets(self.port)
            self.port = self.udp.port
            self.udp.enable_gro()
            self._batcher = SendBatcher(self.udp)
            self._timer = DeadlineTimer(loop, self._on_timer)
            if self.tun_fd is not None:
                loop.add_reader(self.tun_fd, self._on_tun_readable)
                self._readers.append(self.tun_fd)
            for s in self.udp.sockets():
                fam = 6 if s.family == socket.AF_INET6 else 4
                if fam in self._local:
                    loop.add_reader(s.fileno(), self._on_udp_readable, s, fam)
                    self._readers.append(s.fileno())
            now = loop.time()
            for fam, (ip, _) in sorted(self._local.items()):
                if fam == 6 and self.udp.sock6 is None:
                    log.debug("no IPv6 socket; not using local address", extra={"addr": ip})
                    continue
                self._local[fam] = (ip, self.port)
                self.node.add_local_interface((ip, self.port), now)
        except BaseException:
            self.close()
            raise
        log.debug("node driver started", extra={"port": self.port})
        self.wake()

    def close(self) -> None:
        """Stop reading and close the sockets (the TUN fd belongs to the caller)."""
        if self._loop is not None:
            for fd in self._readers:
                self._loop.remove_reader(fd)
        self._readers.clear()
        if self._timer is not None:
            self._timer.cancel()
        if self.udp is not None:
            self.udp.close()
            self.udp = None

    def now(self) -> float:
        """The node's clock: the event loop's monotonic time."""
        assert self._loop is not None, "driver not started"
        return self._loop.time()

    def wake(self) -> None:
        """Send what the node has queued, hand out its events and re-arm the timer."""
        if self._batcher is None:
            return
        self._after_batch()

    # -- output ----------------------------------------------------------------------------

    def _after_batch(self) -> None:
        node = self.node
        batcher = self._batcher
        assert batcher is not None
        while (t := node.poll_transmit()) is not None:
            batcher.add(t.payload, t.dst)
        batcher.flush()
        self.stats.udp_tx_drop += batcher.drops
        batcher.drops = 0
        # Event handlers may call into the node (and so queue more output): loop until quiet.
        while (ev := node.poll_event()) is not None:
            try:
                self.on_event(ev)
            except Exception:
                log.exception("node event handler failed", extra={"event": type(ev).__name__})
            while (t := node.poll_transmit()) is not None:
                batcher.add(t.payload, t.dst)
            batcher.flush()
        assert self._timer is not None
        self._timer.update(node.poll_timeout())

    def _on_timer(self) -> None:
        self.node.handle_timeout(self.now())
        self._after_batch()

    # -- input -----------------------------------------------------------------------------

    def _on_tun_readable(self) -> None:
        read = os.read
        fd = self.tun_fd
        route = self.route
        encapsulate = self.node.encapsulate
        add = self._batcher.add  # type: ignore[union-attr]
        now = self.now()
        n = 0
        unrouted = 0
        for _ in range(BATCH):
            try:
                pkt = read(fd, RECV_SIZE)  # type: ignore[arg-type]
            except (BlockingIOError, InterruptedError):
                break
            n += 1
            peer = route(pkt)
            if peer is None:
                unrouted += 1
                continue
            t = encapsulate(peer, pkt, now)
            if t is not None:
                add(t.payload, t.dst)
        self.stats.tun_rx += n
        self.stats.tun_unrouted += unrouted
        self._after_batch()

    def _on_udp_readable(self, sock: socket.socket, fam: int) -> None:
        handle = self.node.handle_datagram
        local = self._local[fam]
        gro = self.udp.gro if self.udp is not None else False
        write = os.write
        fd = self.tun_fd
        hook = self.on_tun_write
        now = self.now()
        rx = tx = drops = 0
        for _ in range(BATCH):
            try:
                if gro:
                    datagrams, src = recv_segments(sock, RECV_SIZE)
                else:
                    data, src = sock.recvfrom(RECV_SIZE)
                    datagrams = [data]
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                # an ICMP error queued on the socket by an earlier send
                if log.isEnabledFor(TRACE):
                    log.log(TRACE, "udp error", extra={"error": e.strerror})
                continue
            remote = (src[0], src[1])
            rx += len(datagrams)
            for data in datagrams:
                got = handle(local, remote, data, now)
                if got is None:
                    continue
                if hook is not None:
                    hook(got[0], got[1])
                if fd is None:
                    continue
                try:
                    write(fd, got[1])
                    tx += 1
                except OSError as e:
                    drops += 1
                    if log.isEnabledFor(TRACE):
                        log.log(TRACE, "tun write failed", extra={"error": e.strerror})
        self.stats.udp_rx += rx
        self.stats.tun_tx += tx
        self.stats.tun_tx_drop += drops
        self._after_batch()
