"""UDP sockets for the relay: the listening port(s) and one socket per relayed port.

Theory of operation: the pure :class:`~firezone.proto.turn.server.TurnServer` decides everything;
this driver owns file descriptors only. Each socket is non-blocking and registered with
``loop.add_reader``; a readable callback drains up to ``BATCH`` datagrams with plain
``recvfrom`` calls (one callback per burst instead of one per datagram, which is what makes a
Python relay competitive). Per datagram:

* from a client on the listening port: ChannelData goes through the core's fast path
  ``relay_channel_data`` (a dict lookup and a slice, no objects), and is sent straight out of the
  allocation's socket; everything else (STUN) goes to ``handle_client_datagram`` and the commands
  it produces are performed at once;
* from a peer on a relayed port: ``relay_peer_data`` gives the ChannelData datagram and the client
  to send it to, else ``handle_peer_datagram`` (Data indications, permission checks, drops).

Commands: ``SendToClient`` / ``SendToPeer`` write to a socket, ``CreateAllocationPort`` binds a new
socket, ``FreeAllocationPort`` closes one. A single timer is re-armed at ``poll_timeout()`` so the
core can expire allocations, permissions and channels.

A full socket send buffer drops the datagram (UDP semantics) and is counted, never retried: a
relay must not queue unboundedly on behalf of a peer.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from firezone.logs import TRACE

log = logging.getLogger(__name__)

# Datagrams read per readable callback before yielding to the loop (fairness between sockets).
BATCH = 32
# Big kernel buffers absorb bursts while the single Python thread is busy elsewhere. The listening
# socket carries every client; a relayed port carries one allocation's peers, and there can be
# thousands of those, so their buffers stay smaller.
LISTEN_BUFFER_BYTES = 16 * 1024 * 1024
RELAY_BUFFER_BYTES = 2 * 1024 * 1024
MAX_DATAGRAM = 65535


@dataclass
class DriverStats:
    """Counters kept by the driver itself (the core keeps protocol counters)."""

    datagrams_in: int = 0
    wakeups: int = 0  # readable callbacks; datagrams_in / wakeups is the batching achieved
    drops: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1


def _tune(sock: socket.socket, size: int) -> None:
    # SO_RCVBUFFORCE / SO_SNDBUFFORCE (33 / 32) pass net.core.*mem_max when we have CAP_NET_ADMIN.
    for opt, force in ((socket.SO_RCVBUF, 33), (socket.SO_SNDBUF, 32)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, size)
            except OSError:
                pass


def open_udp(host: str, port: int, *, reuse_port: bool = False,
             buffer_bytes: int = RELAY_BUFFER_BYTES) -> socket.socket:
    """A non-blocking UDP socket bound to ``host:port`` (IPv6 sockets are v6-only)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        _tune(sock, buffer_bytes)
        sock.setblocking(False)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class RelayUdpDriver:
    """Pump datagrams between sockets and a TurnServer core on one event loop."""

    def __init__(self, server: Any, *, listen: list[tuple[str, int]], relay_bind4: str | None,
                 relay_bind6: str | None, loop: asyncio.AbstractEventLoop,
                 clock: Callable[[], float] | None = None, reuse_port: bool = False,
                 on_port_unavailable: Callable[[int, int], None] | None = None) -> None:
        self.server = server
        self.listen = listen
        self.relay_bind: dict[int, str | None] = {socket.AF_INET: relay_bind4,
                                                  socket.AF_INET6: relay_bind6}
        self.loop = loop
        self.clock = clock or loop.time
        self.reuse_port = reuse_port
        self.on_port_unavailable = on_port_unavailable
        self.stats = DriverStats()
        self.listen_socks: list[socket.socket] = []
        self._client_sock: dict[int, socket.socket] = {}
        # relayed port -> socket, one dict per family (ports are per family)
        self._relay4: dict[int, socket.socket] = {}
        self._relay6: dict[int, socket.socket] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._closed = False
        from firezone.proto.turn import server as turn_server

        self._cmd = turn_server

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> list[tuple[str, int]]:
        """Bind the listening sockets; return their bound addresses."""
        bound: list[tuple[str, int]] = []
        try:
            for host, port in self.listen:
                sock = open_udp(host, port, reuse_port=self.reuse_port,
                                buffer_bytes=LISTEN_BUFFER_BYTES)
                self.listen_socks.append(sock)
                self._client_sock.setdefault(sock.family, sock)
                if sock.family == socket.AF_INET6:
                    self.loop.add_reader(sock.fileno(), self._on_client6, sock)
                else:
                    self.loop.add_reader(sock.fileno(), self._on_client4, sock)
                name = sock.getsockname()
                bound.append((name[0], name[1]))
        except BaseException:
            self.close()
            raise
        self._rearm()
        return bound

    def close(self) -> None:
        """Close every socket and cancel the timer (idempotent)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for sock in [*self.listen_socks, *self._relay4.values(), *self._relay6.values()]:
            try:
                self.loop.remove_reader(sock.fileno())
            except (ValueError, OSError):
                pass
            sock.close()
        self.listen_socks.clear()
        self._client_sock.clear()
        self._relay4.clear()
        self._relay6.clear()

    @property
    def relay_socket_count(self) -> int:
        return len(self._relay4) + len(self._relay6)

    # ------------------------------------------------------------------ readable callbacks

    def _on_client4(self, sock: socket.socket) -> None:
        self._drain_client(sock, False)

    def _on_client6(self, sock: socket.socket) -> None:
        self._drain_client(sock, True)

    def _drain_client(self, sock: socket.socket, v6: bool) -> None:
        recvfrom = sock.recvfrom
        fast = self.server.relay_channel_data
        relay4 = self._relay4
        relay6 = self._relay6
        n = 0
        slow = False
        try:
            for _ in range(BATCH):
                try:
                    data, addr = recvfrom(MAX_DATAGRAM)
                except BlockingIOError:
                    break
                except (ConnectionRefusedError, ConnectionResetError):
                    # An ICMP error for an earlier send, reported once; the socket is fine.
                    self.stats.drop("icmp_error")
                    continue
                except OSError as e:
                    self.stats.drop(f"recv_{errno.errorcode.get(e.errno or 0, 'error').lower()}")
                    break
                n += 1
                if v6:
                    addr = (addr[0], addr[1])
                if data and 0x40 <= data[0] <= 0x7F:
                    r = fast(data, addr)
                    if r is not None:
                        payload, peer, relay_port = r
                        out = (relay6 if ":" in peer[0] else relay4).get(relay_port)
                        if out is not None:
                            try:
                                out.sendto(payload, peer)
                            except BlockingIOError:
                                self.stats.drop("send_buffer_full")
                            except OSError:
                                self.stats.drop("send_error")
                        else:
                            self.stats.drop("no_relay_socket")
                        continue
                slow = True
                if log.isEnabledFor(TRACE):
                    log.log(TRACE, "client datagram", extra={"client": addr, "len": len(data)})
                self.server.handle_client_datagram(data, addr, self.clock())
                self._perform()
        finally:
            self.stats.datagrams_in += n
            self.stats.wakeups += 1
            if slow:
                self._rearm()

    def _on_peer(self, sock: socket.socket, relay_port: int, family: int) -> None:
        recvfrom = sock.recvfrom
        fast = self.server.relay_peer_data
        v6 = family == socket.AF_INET6
        n = 0
        slow = False
        try:
            for _ in range(BATCH):
                try:
                    data, addr = recvfrom(MAX_DATAGRAM)
                except BlockingIOError:
                    break
                except (ConnectionRefusedError, ConnectionResetError):
                    # An ICMP error for an earlier send, reported once; the socket is fine.
                    self.stats.drop("icmp_error")
                    continue
                except OSError as e:
                    self.stats.drop(f"recv_{errno.errorcode.get(e.errno or 0, 'error').lower()}")
                    break
                n += 1
                if v6:
                    addr = (addr[0], addr[1])
                r = fast(data, addr, relay_port)
                if r is not None:
                    out_data, client = r
                    out = self._client_sock.get(socket.AF_INET6 if ":" in client[0] else socket.AF_INET)
                    if out is not None:
                        try:
                            out.sendto(out_data, client)
                        except BlockingIOError:
                            self.stats.drop("send_buffer_full")
                        except OSError:
                            self.stats.drop("send_error")
                    continue
                slow = True
                self.server.handle_peer_datagram(data, addr, relay_port, 6 if v6 else 4,
                                                 self.clock())
                self._perform()
        finally:
            self.stats.datagrams_in += n
            self.stats.wakeups += 1
            if slow:
                self._rearm()

    # ------------------------------------------------------------------ commands and timer

    def _perform(self) -> None:
        cmd_mod = self._cmd
        poll = self.server.poll_command
        while (cmd := poll()) is not None:
            if isinstance(cmd, cmd_mod.SendToClient):
                fam = socket.AF_INET6 if ":" in cmd.client[0] else socket.AF_INET
                self._send(self._client_sock.get(fam), cmd.data, cmd.client)
            elif isinstance(cmd, cmd_mod.SendToPeer):
                table = self._relay6 if cmd.family == 6 else self._relay4
                self._send(table.get(cmd.relay_port), cmd.data, cmd.peer)
            elif isinstance(cmd, cmd_mod.CreateAllocationPort):
                self._open_relay_port(cmd.port, _family(cmd.family))
            elif isinstance(cmd, cmd_mod.FreeAllocationPort):
                self._close_relay_port(cmd.port, _family(cmd.family))
            else:  # pragma: no cover - a new command the driver does not know yet
                log.warning("unknown relay command", extra={"command": type(cmd).__name__})

    def _send(self, sock: socket.socket | None, data: bytes, addr: tuple[str, int]) -> None:
        if sock is None:
            self.stats.drop("no_socket")
            return
        try:
            sock.sendto(data, addr)
        except BlockingIOError:
            self.stats.drop("send_buffer_full")
        except OSError as e:
            self.stats.drop("send_error")
            log.debug("sendto failed", extra={"addr": addr, "error": str(e)})

    def _open_relay_port(self, port: int, family: int) -> None:
        table = self._relay6 if family == socket.AF_INET6 else self._relay4
        if port in table:
            return
        host = self.relay_bind.get(family)
        if host is None:
            log.warning("allocation on a family without a relay address", extra={"family": family})
            self._port_unavailable(port, family)
            return
        try:
            sock = open_udp(host, port)
        except OSError as e:
            log.warning("cannot bind relayed port", extra={"port": port, "error": e.strerror})
            self.stats.drop("relay_port_bind_failed")
            self._port_unavailable(port, family)
            return
        table[port] = sock
        self.loop.add_reader(sock.fileno(), self._on_peer, sock, port, family)
        log.debug("relayed port opened", extra={"port": port, "family": int(family)})

    def _port_unavailable(self, port: int, family: int) -> None:
        if self.on_port_unavailable is not None:
            self.on_port_unavailable(port, 6 if family == socket.AF_INET6 else 4)

    def _close_relay_port(self, port: int, family: int) -> None:
        table = self._relay6 if family == socket.AF_INET6 else self._relay4
        sock = table.pop(port, None)
        if sock is None:
            return
        try:
            self.loop.remove_reader(sock.fileno())
        finally:
            sock.close()
        log.debug("relayed port closed", extra={"port": port, "family": int(family)})

    def _rearm(self) -> None:
        if self._closed:
            return
        deadline = self.server.poll_timeout()
        if isinstance(deadline, tuple):
            deadline = deadline[0]
        if deadline is None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = self._timer_at = None
            return
        if self._timer is not None and self._timer_at is not None and self._timer_at <= deadline:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self.loop.call_at(max(deadline, self.loop.time()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        if self._closed:
            return
        self.server.handle_timeout(self.clock())
        self._perform()
        self._rearm()


def _family(f: int) -> int:
    """The socket family for the core's address family number (4 or 6)."""
    return socket.AF_INET6 if f == 6 else socket.AF_INET
