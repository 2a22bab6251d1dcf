"""UDP sockets for the data plane: one non-blocking socket per address family on one port.

Two sockets (IPv4, and IPv6-only) instead of one dual-stack socket, so IPv4 peers appear as plain
``("a.b.c.d", port)`` tuples without per-packet v4-mapped address conversion.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct

from firezone.runtime import full_tunnel

log = logging.getLogger(__name__)

# Large buffers absorb bursts while the single Python thread is busy with the other direction.
DEFAULT_BUFFER = 4 * 1024 * 1024
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
# linux/udp.h: segmentation offload. One sendmsg carries many equal-size datagrams (the last may be
# shorter) and, with GRO on the receiving socket, one recvmsg returns them still glued together.
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
UDP_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000
_GSO_SIZE = struct.Struct("=H")
_GRO_SIZE = struct.Struct("=i")


def _set_buffers(sock: socket.socket, size: int) -> None:
    for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)


class UdpSockets:
    """An IPv4 and (when available) an IPv6 socket bound to the same port."""

    def __init__(self, port: int | None = None, *, host4: str = "0.0.0.0", host6: str = "::",
                 buffer_size: int = DEFAULT_BUFFER, mark: bool = False) -> None:
        """``mark``: give the sockets fz's firewall mark (see :mod:`firezone.runtime.full_tunnel`)."""
        self.sock4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock6: socket.socket | None = None
        try:
            if mark:
                full_tunnel.mark_socket(self.sock4)
            self.sock4.setblocking(False)
            _set_buffers(self.sock4, buffer_size)
            self.sock4.bind((host4, port or 0))
            self.port: int = self.sock4.getsockname()[1]
            try:
                s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            except OSError as e:
                log.debug("no IPv6 socket", extra={"error": str(e)})
            else:
                try:
                    if mark:
                        full_tunnel.mark_socket(s6)
                    s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    s6.setblocking(False)
                    _set_buffers(s6, buffer_size)
                    s6.bind((host6, self.port))
                    self.sock6 = s6
                except OSError as e:
                    s6.close()
                    if e.errno not in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                        raise
                    log.debug("no IPv6 socket", extra={"error": str(e)})
        except BaseException:
            self.close()
            raise

        self.gso = True
        self.gro = False

    def enable_gro(self) -> bool:
        """Ask the kernel to hand over coalesced datagrams (see :func:`recv_segments`)."""
        ok = True
        for sock in self.sockets():
            try:
                sock.setsockopt(SOL_UDP, UDP_GRO, 1)
            except OSError:
                ok = False
        self.gro = ok
        return ok

    def sockets(self) -> list[socket.socket]:
        return [self.sock4] + ([self.sock6] if self.sock6 is not None else [])

    def sendto(self, data: bytes, addr: tuple[str, int]) -> bool:
        """Send one datagram; False (dropped) when the kernel buffer is full or the route is gone."""
        sock = self.sock6 if ":" in addr[0] else self.sock4
        if sock is None:
            return False
        try:
            sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:
            # ICMP errors from earlier sends surface here (ECONNREFUSED, EHOSTUNREACH): UDP is lossy.
            log.debug("sendto failed", extra={"error": e.strerror})
            return False
        return True

    def send_segments(self, parts: list[bytes], size: int, addr: tuple[str, int]) -> int:
        """Send ``parts`` (all ``size`` bytes, the last possibly shorter) to ``addr`` with one GSO
        ``sendmsg``; falls back to one ``sendto`` each if the kernel refuses. Returns drops."""
        if len(parts) == 1 or not self.gso:
            return sum(not self.sendto(p, addr) for p in parts)
        sock = self.sock6 if ":" in addr[0] else self.sock4
        if sock is None:
            return len(parts)
        try:
            sock.sendmsg(parts, [(SOL_UDP, UDP_SEGMENT, _GSO_SIZE.pack(size))], 0, addr)
        except (BlockingIOError, InterruptedError):
            return len(parts)
        except OSError as e:
            if e.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                log.info("UDP segmentation offload unavailable; sending datagrams one by one",
                         extra={"error": e.strerror})
                self.gso = False
                return sum(not self.sendto(p, addr) for p in parts)
            log.debug("sendmsg failed", extra={"error": e.strerror})
            return len(parts)
        return 0

    def close(self) -> None:
        for s in (self.sock4, self.sock6):
            if s is not None:
                s.close()


class SendBatcher:
    """Collects outgoing datagrams and sends runs of equal-size ones to one address with GSO."""

    __slots__ = ("addr", "drops", "limit", "parts", "sent", "size", "udp")

    def __init__(self, udp: UdpSockets) -> None:
        self.udp = udp
        self.parts: list[bytes] = []
        self.addr: tuple[str, int] | None = None
        self.size = 0
        self.limit = 1
        self.drops = 0
        self.sent = 0

    def add(self, data: bytes, addr: tuple[str, int]) -> None:
        parts = self.parts
        n = len(data)
        if parts:
            if addr == self.addr and n <= self.size and len(parts) < self.limit:
                parts.append(data)
                if n < self.size:  # only the last segment may be shorter
                    self.flush()
                return
            self.flush()
            parts = self.parts
        self.addr = addr
        self.size = n
        self.limit = min(UDP_MAX_SEGMENTS, GSO_MAX_BYTES // n) if n else 1
        parts.append(data)

    def flush(self) -> None:
        if self.parts:
            self.sent += len(self.parts)
            self.drops += self.udp.send_segments(self.parts, self.size, self.addr)  # type: ignore[arg-type]
            self.parts = []


def recv_segments(sock: socket.socket, bufsize: int = 65535) -> tuple[list[bytes], tuple[str, int]]:
    """One ``recvmsg``: the datagrams it carried (several when GRO coalesced them) and the source.

    Raises BlockingIOError when nothing is queued, like ``recvfrom``.
    """
    data, anc, _flags, src = sock.recvmsg(bufsize, 64)
    if anc:
        for level, typ, value in anc:
            if level == SOL_UDP and typ == UDP_GRO:
                seg = _GRO_SIZE.unpack_from(value)[0]
                if 0 < seg < len(data):
                    return [data[i:i + seg] for i in range(0, len(data), seg)], src
    return [data], src
