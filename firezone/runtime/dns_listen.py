"""UDP and TCP DNS listeners on the sentinel addresses, driving the stub and forwarding upstream.

Each query goes to the stub's ``handle_query`` (a :class:`~firezone.proto.dns.stub.DnsStub` or
anything with the same method, e.g. ``ClientState.handle_dns_query``). Local answers go straight
back; forwarded queries go to the upstream over the transport they arrived on:

- UDP: one connected socket per upstream (so only that upstream's datagrams are accepted). The
  query's ID is swapped for a fresh random one while in flight (two clients may use the same ID)
  and restored on the way back; nothing else in either message changes, so EDNS options and a
  set TC bit pass through and the client's resolver retries over TCP on its own.
- TCP: one upstream connection per forwarded query (TCP DNS is the rare truncation-retry path).

A query without a response after :data:`FORWARD_TIMEOUT` is answered with SERVFAIL.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import struct
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from firezone.logs import TRACE
from firezone.proto.dns.stub import Answer, Forward, StubResult, error_response
from firezone.runtime import full_tunnel

__all__ = ["FORWARD_TIMEOUT", "DnsServer"]

log = logging.getLogger(__name__)

FORWARD_TIMEOUT = 5.0
# RFC 7766 §6.2.3: close idle client TCP connections after a few seconds.
TCP_IDLE_TIMEOUT = 10.0
TCP_MAX_INFLIGHT = 16  # concurrent forwarded queries per client TCP connection
_SERVFAIL = 2
_MAX_PENDING = 60000  # of 65536 IDs per upstream socket

Handler = Callable[..., StubResult]
Addr = tuple[str, int]


def _parse_listen(spec: str | tuple[Any, ...]) -> tuple[str, int, str]:
    if isinstance(spec, str):
        return spec, 53, spec
    if len(spec) == 2:
        return str(spec[0]), int(spec[1]), str(spec[0])
    return str(spec[0]), int(spec[1]), str(spec[2])


class _Pending:
    __slots__ = ("client", "deadline", "orig_id", "query", "reply")

    def __init__(self, reply: Callable[[bytes, Any], None], client: Any, query: bytes,
                 deadline: float) -> None:
        self.reply = reply
        self.client = client
        self.query = query
        self.orig_id = query[:2]
        self.deadline = deadline


class _Upstream(asyncio.DatagramProtocol):
    """A connected UDP socket to one upstream with the queries in flight on it."""

    def __init__(self, server: DnsServer, addr: Addr) -> None:
        self.server = server
        self.addr = addr
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: dict[int, _Pending] = {}
        self.waiting: list[tuple[_Pending, bytes]] = []
        self.failed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, p: _Pending) -> None:
        pending = self.pending
        if len(pending) >= _MAX_PENDING:
            self.server.count("upstream_busy")
            return
        qid = secrets.randbits(16)
        while qid in pending:
            qid = secrets.randbits(16)
        pending[qid] = p
        data = qid.to_bytes(2, "big") + p.query[2:]
        if self.transport is None:
            self.waiting.append((p, data))
        else:
            self.transport.sendto(data)

    def flush(self) -> None:
        assert self.transport is not None
        for _, data in self.waiting:
            self.transport.sendto(data)
        self.waiting.clear()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) < 12:
            self.server.count("upstream_short")
            return
        p = self.pending.pop((data[0] << 8) | data[1], None)
        if p is None:
            self.server.count("upstream_unmatched")
            return
        p.reply(p.orig_id + data[2:], p.client)

    def error_received(self, exc: Exception) -> None:
        log.debug("dns upstream error", extra={"upstream": self.addr[0], "error": str(exc)})

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


class _UdpListener(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer, sentinel: str) -> None:
        self.server = server
        self.sentinel = sentinel
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        server = self.server
        r = server.handle(data, sentinel=self.sentinel, tcp=False, now=server.loop.time())
        t = type(r)
        if t is Forward:
            server.forward_udp(r, self._reply, addr)  # type: ignore[arg-type]
        elif t is Answer and self.transport is not None:
            self.transport.sendto(r.data, addr)  # type: ignore[attr-defined]
        elif log.isEnabledFor(TRACE):
            log.log(TRACE, "dns query dropped", extra={"reason": getattr(r, "reason", "?")})

    def _reply(self, data: bytes, addr: Any) -> None:
        if self.transport is not None:
            self.transport.sendto(data, addr)


class DnsServer:
    """Serve DNS on the given addresses over UDP and TCP through a stub's ``handle_query``."""

    def __init__(self, stub: Any, loop: asyncio.AbstractEventLoop | None = None, *,
                 timeout: float = FORWARD_TIMEOUT, mark: bool = False) -> None:
        """``mark``: forward over sockets carrying fz's firewall mark, so that upstream queries
        stay outside a full tunnel (see :mod:`firezone.runtime.full_tunnel`)."""
        self.handle: Handler = getattr(stub, "handle_query", None) or stub
        self.loop = loop or asyncio.get_event_loop()
        self.timeout = timeout
        self.mark = mark
        self.counters: dict[str, int] = {}
        self.bound: list[tuple[str, int]] = []
        self._udp: list[asyncio.DatagramTransport] = []
        self._tcp: list[asyncio.Server] = []
        self._upstreams: dict[Addr, _Upstream] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    async def start(self, addresses: Iterable[str | tuple[Any, ...]]) -> None:
        """Listen on each address: ``"ip"`` (port 53), ``(ip, port)`` or ``(ip, port, sentinel)``.

        The sentinel is the address the stub is told the query arrived on (default: the ip).
        Port 0 picks a free port, the same for UDP and TCP.
        """
        for spec in addresses:
            host, port, sentinel = _parse_listen(spec)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            transport, _ = await self.loop.create_datagram_endpoint(
                self._udp_factory(sentinel), local_addr=(host, port), family=family)
            self._udp.append(transport)
            port = transport.get_extra_info("sockname")[1]
            server = await asyncio.start_server(
                self._tcp_factory(sentinel), host, port, family=family, reuse_address=True)
            self._tcp.append(server)
            self.bound.append((host, port))
            log.debug("dns listening", extra={"address": host, "port": port})
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(1.0, self._sweep)

    def _udp_factory(self, sentinel: str) -> Callable[[], _UdpListener]:
        return lambda: _UdpListener(self, sentinel)

    def _tcp_factory(self, sentinel: str) -> Callable[
            [asyncio.StreamReader, asyncio.StreamWriter], Coroutine[Any, Any, None]]:
        return lambda r, w: self._serve_tcp(r, w, sentinel)

    def close(self) -> None:
        """Stop listening and forwarding; queries in flight are abandoned."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for t in self._udp:
            t.close()
        for s in self._tcp:
            s.close()
        for u in self._upstreams.values():
            if u.transport is not None:
                u.transport.close()
        for task in self._tasks:
            task.cancel()
        self._udp.clear()
        self._tcp.clear()
        self._upstreams.clear()

    def count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    # --- UDP forwarding -----------------------------------------------------------------------------
    def forward_udp(self, r: Forward, reply: Callable[[bytes, Any], None], client: Any) -> None:
        up = self._upstreams.get(r.upstream)
        if up is None:
            up = self._upstreams[r.upstream] = _Upstream(self, r.upstream)
            self._spawn(self._connect_upstream(up))
        up.send(_Pending(reply, client, r.data, self.loop.time() + self.timeout))

    async def _connect_upstream(self, up: _Upstream) -> None:
        host, port = up.addr
        try:
            sock = self._upstream_socket(host, socket.SOCK_DGRAM)
            try:
                sock.connect((host, port))
            except OSError:
                sock.close()
                raise
            await self.loop.create_datagram_endpoint(lambda: up, sock=sock)
        except OSError as e:
            log.warning("cannot reach DNS upstream", extra={"upstream": host, "error": str(e)})
            self._upstreams.pop(up.addr, None)
            for p, _ in up.waiting:
                p.reply(error_response(p.query, _SERVFAIL), p.client)
            up.pending.clear()
            return
        up.flush()

    def _sweep(self) -> None:
        now = self.loop.time()
        for up in list(self._upstreams.values()):
            expired = [qid for qid, p in up.pending.items() if p.deadline <= now]
            for qid in expired:
                p = up.pending.pop(qid)
                self.count("upstream_timeout")
                p.reply(error_response(p.query, _SERVFAIL), p.client)
        if not self._closed:
            self._sweeper = self.loop.call_later(1.0, self._sweep)

    # --- TCP ----------------------------------------------------------------------------------------
    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         sentinel: str) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        inflight = asyncio.Semaphore(TCP_MAX_INFLIGHT)
        children: set[asyncio.Task[Any]] = set()
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_TIMEOUT)
                    (length,) = struct.unpack("!H", head)
                    data = await asyncio.wait_for(reader.readexactly(length), TCP_IDLE_TIMEOUT)
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    break
                r = self.handle(data, sentinel=sentinel, tcp=True, now=self.loop.time())
                if type(r) is Answer:
                    writer.write(struct.pack("!H", len(r.data)) + r.data)
                elif type(r) is Forward:
                    await inflight.acquire()
                    child = asyncio.ensure_future(self._forward_tcp(r, writer, inflight))
                    children.add(child)
                    child.add_done_callback(children.discard)
        finally:
            if children:
                await asyncio.gather(*children, return_exceptions=True)
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def _forward_tcp(self, r: Forward, writer: asyncio.StreamWriter,
                           inflight: asyncio.Semaphore) -> None:
        try:
            try:
                response = await asyncio.wait_for(self._ask_tcp(r.upstream, r.data), self.timeout)
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
                self.count("upstream_tcp_error")
                log.debug("dns tcp forward failed", extra={"upstream": r.upstream[0], "error": repr(e)})
                response = error_response(r.data, _SERVFAIL)
            if not writer.is_closing():
                writer.write(struct.pack("!H", len(response)) + response)
        finally:
            inflight.release()

    def _upstream_socket(self, host: str, type_: int) -> socket.socket:
        """A non-blocking socket towards an upstream, with fz's mark when asked for."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = full_tunnel.marked_socket(family, type_) if self.mark else socket.socket(family, type_)
        sock.setblocking(False)
        return sock

    async def _ask_tcp(self, upstream: Addr, data: bytes) -> bytes:
        sock = self._upstream_socket(upstream[0], socket.SOCK_STREAM)
        try:
            await self.loop.sock_connect(sock, upstream)
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            writer.write(struct.pack("!H", len(data)) + data)
            (length,) = struct.unpack("!H", await reader.readexactly(2))
            return await reader.readexactly(length)
        finally:
            writer.close()

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
