"""Notice network changes (addresses, default routes) through rtnetlink; one debounced callback.

:class:`NetWatcher` subscribes a raw ``NETLINK_ROUTE`` socket to the IPv4/IPv6 address and route
groups and to link changes, reads it with ``loop.add_reader`` (pyroute2's asyncio API does not
work under uvloop), and calls ``on_change()`` once, ``debounce`` seconds after the last relevant
message of a burst.

What counts is decided by :class:`NetState`, which mirrors the usable network: global-scope
addresses that finished duplicate address detection, and default routes of the main table.
A message that leaves that mirror unchanged is noise and ignored: the periodic lifetime refresh
of a SLAAC address or of a router-advertised default route, a tentative IPv6 address, a link-local
address, and anything on an ignored device (loopback, our own TUN, whose routes and addresses we
set ourselves). IPv4 routes the kernel flushes when a link goes down come without a
``RTM_DELROUTE``, so a link leaving the UP state drops the default routes through it. A receive
buffer overflow (``ENOBUFS``) lost messages: that counts as a change, and the mirror is rebuilt.

The snapshot at start (and after an overflow) comes from dump requests on a second, blocking
socket, made after the subscription so nothing falls between the two.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)

# linux/netlink.h, linux/rtnetlink.h, linux/if_addr.h, linux/if.h
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ROOT = 0x100
NLM_F_MATCH = 0x200
NLM_F_REPLACE = 0x100
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
GROUPS = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
IFA_F_DADFAILED = 0x08
IFA_F_TENTATIVE = 0x40
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_PREFSRC, RTA_TABLE = 1, 4, 5, 6, 7, 15
IFLA_IFNAME = 3
IFF_UP = 0x1
RT_TABLE_MAIN = 254
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_SITE = 200

_NLMSGHDR = struct.Struct("=IHHII")
_RTATTR = struct.Struct("=HH")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")
_IFINFOMSG = struct.Struct("=BxHiII")
_RTGENMSG = struct.Struct("=Bxxx")

DEBOUNCE = 0.5
RECV_SIZE = 1 << 16


# --- messages -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinkMsg:
    new: bool
    index: int
    name: str | None
    flags: int


@dataclass(frozen=True, slots=True)
class AddrMsg:
    new: bool
    family: int
    index: int
    address: str
    prefixlen: int
    scope: int
    flags: int


@dataclass(frozen=True, slots=True)
class RouteMsg:
    new: bool
    replace: bool
    family: int
    table: int
    dst_len: int
    tos: int
    type: int
    oif: int | None
    gateway: str | None
    prefsrc: str | None
    priority: int


NetlinkMsg = LinkMsg | AddrMsg | RouteMsg


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attrs(data: bytes, off: int, end: int) -> Iterator[tuple[int, bytes]]:
    while off + _RTATTR.size <= end:
        length, kind = _RTATTR.unpack_from(data, off)
        if length < _RTATTR.size or off + length > end:
            return
        yield kind & 0x3FFF, data[off + _RTATTR.size : off + length]
        off += _align(length)


def _ip(family: int, raw: bytes) -> str | None:
    if family == socket.AF_INET and len(raw) == 4:
        return str(ipaddress.IPv4Address(raw))
    if family == socket.AF_INET6 and len(raw) == 16:
        return str(ipaddress.IPv6Address(raw))
    return None


def parse(data: bytes) -> Iterator[NetlinkMsg | str]:
    """The link, address and route messages in one netlink datagram; ``"done"`` / ``"error"``
    for the end of a dump. Anything malformed or of another type is skipped."""
    off = 0
    n = len(data)
    while off + _NLMSGHDR.size <= n:
        length, mtype, flags, _seq, _pid = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size or off + length > n:
            return
        body, end = off + _NLMSGHDR.size, off + length
        off += _align(length)
        if mtype == NLMSG_DONE:
            yield "done"
        elif mtype == NLMSG_ERROR:
            yield "error"
        elif mtype in (RTM_NEWLINK, RTM_DELLINK) and body + _IFINFOMSG.size <= end:
            _fam, _typ, index, lflags, _change = _IFINFOMSG.unpack_from(data, body)
            name = None
            for kind, val in _attrs(data, body + _IFINFOMSG.size, end):
                if kind == IFLA_IFNAME:
                    name = val.split(b"\0", 1)[0].decode(errors="replace")
            yield LinkMsg(mtype == RTM_NEWLINK, index, name, lflags)
        elif mtype in (RTM_NEWADDR, RTM_DELADDR) and body + _IFADDRMSG.size <= end:
            fam, plen, aflags, scope, index = _IFADDRMSG.unpack_from(data, body)
            addr = local = None
            for kind, val in _attrs(data, body + _IFADDRMSG.size, end):
                if kind == IFA_ADDRESS:
                    addr = _ip(fam, val)
                elif kind == IFA_LOCAL:
                    local = _ip(fam, val)
                elif kind == IFA_FLAGS and len(val) == 4:
                    aflags = struct.unpack("=I", val)[0]
            # IFA_LOCAL is the address itself on point-to-point links (IFA_ADDRESS is the peer).
            a = local or addr
            if a is not None:
                yield AddrMsg(mtype == RTM_NEWADDR, fam, index, a, plen, scope, aflags)
        elif mtype in (RTM_NEWROUTE, RTM_DELROUTE) and body + _RTMSG.size <= end:
            fam, dst_len, _src_len, tos, table, _proto, _scope, rtype, _rflags = _RTMSG.unpack_from(
                data, body
            )
            oif = gw = prefsrc = None
            prio = 0
            for kind, val in _attrs(data, body + _RTMSG.size, end):
                if kind == RTA_OIF and len(val) == 4:
                    oif = struct.unpack("=I", val)[0]
                elif kind == RTA_GATEWAY:
                    gw = _ip(fam, val)
                elif kind == RTA_PREFSRC:
                    prefsrc = _ip(fam, val)
                elif kind == RTA_PRIORITY and len(val) == 4:
                    prio = struct.unpack("=I", val)[0]
                elif kind == RTA_TABLE and len(val) == 4:
                    table = struct.unpack("=I", val)[0]
            yield RouteMsg(mtype == RTM_NEWROUTE, bool(flags & NLM_F_REPLACE), fam, table, dst_len,
                           tos, rtype, oif, gw, prefsrc, prio)


# --- the mirror of the usable network ---------------------------------------------------------------


AddrKey = tuple[int, int, str, int]  # family, ifindex, address, prefixlen
RouteKey = tuple[int, int, int, int, int | None, str | None, str | None, int]
# family, table, priority, tos, oif, gateway, prefsrc, type


class NetState:
    """Usable addresses and default routes, minus ignored devices; ``apply`` says what changed."""

    def __init__(self, ignore: Iterable[str] = ("lo",)) -> None:
        self.ignore = frozenset(ignore)
        self.names: dict[int, str] = {}
        self.addresses: set[AddrKey] = set()
        self.routes: set[RouteKey] = set()

    def _ignored(self, index: int | None, name_of: Callable[[int], str | None]) -> bool:
        if index is None:
            return False
        name = self.names.get(index)
        if name is None:
            name = name_of(index)
            if name is not None:
                self.names[index] = name
        return name is not None and name in self.ignore

    def apply(self, msg: NetlinkMsg, name_of: Callable[[int], str | None] = lambda _i: None) -> bool:
        """Update the mirror with one message; True if the usable network changed."""
        if isinstance(msg, LinkMsg):
            if msg.name is not None:
                self.names[msg.index] = msg.name
            if msg.new and msg.flags & IFF_UP:
                return False
            # Down or deleted: the kernel drops IPv4 routes through it without telling.
            gone = {r for r in self.routes if r[4] == msg.index}
            addrs = {a for a in self.addresses if a[1] == msg.index} if not msg.new else set()
            self.routes -= gone
            self.addresses -= addrs
            if not msg.new:
                self.names.pop(msg.index, None)
            return bool(gone or addrs)
        if isinstance(msg, AddrMsg):
            if self._ignored(msg.index, name_of):
                return False
            key: AddrKey = (msg.family, msg.index, msg.address, msg.prefixlen)
            usable = (
                msg.new
                and msg.scope in (RT_SCOPE_UNIVERSE, RT_SCOPE_SITE)
                and not msg.flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED)
            )
            if usable:
                if key in self.addresses:
                    return False  # a lifetime refresh
                self.addresses.add(key)
                return True
            if key in self.addresses:
                self.addresses.discard(key)
                return True
            return False
        if msg.dst_len != 0 or msg.table != RT_TABLE_MAIN or self._ignored(msg.oif, name_of):
            return False
        rkey: RouteKey = (msg.family, msg.table, msg.priority, msg.tos, msg.oif, msg.gateway,
                          msg.prefsrc, msg.type)
        before = set(self.routes)
        if msg.new:
            if msg.replace:
                self.routes = {r for r in self.routes if r[:4] != rkey[:4]}
            self.routes.add(rkey)
        else:
            self.routes.discard(rkey)
        return self.routes != before


# --- the driver ----------------------------------------------------------------------------------


def _open(groups: int) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
    try:
        sock.bind((0, groups))
    except OSError:
        sock.close()
        raise
    return sock


def dump(state: NetState, name_of: Callable[[int], str | None] = lambda _i: None) -> None:
    """Fill ``state`` with the current links, addresses and default routes (blocking)."""
    with _open(0) as sock:
        sock.settimeout(5.0)
        for seq, (mtype, fam) in enumerate(
            ((RTM_GETLINK, socket.AF_UNSPEC), (RTM_GETADDR, socket.AF_UNSPEC),
             (RTM_GETROUTE, socket.AF_UNSPEC)), start=1):
            body = _RTGENMSG.pack(fam)
            if mtype == RTM_GETROUTE:
                body = _RTMSG.pack(fam, 0, 0, 0, 0, 0, 0, 0, 0)
            hdr = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), mtype, NLM_F_REQUEST | NLM_F_ROOT | NLM_F_MATCH,
                                 seq, 0)
            sock.send(hdr + body)
            done = False
            while not done:
                data = sock.recv(RECV_SIZE)
                for m in parse(data):
                    if m in ("done", "error"):
                        done = True
                    elif not isinstance(m, str):
                        state.apply(m, name_of)


def _name_of(index: int) -> str | None:
    try:
        return socket.if_indextoname(index)
    except OSError:
        return None


class NetWatcher:
    """Calls ``on_change()`` once per burst of network changes (see the module docstring)."""

    def __init__(self, on_change: Callable[[], None], *, ignore: Iterable[str] = ("lo",),
                 debounce: float = DEBOUNCE) -> None:
        self.on_change = on_change
        self.debounce = debounce
        self.state = NetState(ignore)
        self.changes = 0  # callbacks made
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        """Subscribe, then take the snapshot the changes are compared with."""
        self._loop = asyncio.get_running_loop()
        sock = _open(GROUPS)
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self._sock = sock
        await asyncio.to_thread(dump, self.state, _name_of)
        self._loop.add_reader(sock.fileno(), self._readable)
        log.debug("watching network changes", extra={"addresses": len(self.state.addresses),
                                                      "default_routes": len(self.state.routes)})

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._sock is not None:
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        changed = False
        while True:
            try:
                data = sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    log.warning("stopped watching for network changes", extra={"error": str(e)})
                    self.close()
                    return
                log.debug("netlink messages lost; taking a new snapshot")
                self.state = NetState(self.state.ignore)
                with contextlib.suppress(OSError):
                    dump(self.state, _name_of)
                changed = True
                continue
            for m in parse(data):
                if isinstance(m, str):
                    continue
                if self.state.apply(m, _name_of):
                    changed = True
                    log.debug("network change", extra={"change": _describe(m)})
        if changed:
            self._arm()

    def _arm(self) -> None:
        assert self._loop is not None
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(self.debounce, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self.changes += 1
        self.on_change()


def _describe(m: NetlinkMsg) -> str:
    verb = "new" if m.new else "del"
    if isinstance(m, AddrMsg):
        return f"{verb} address {m.address}/{m.prefixlen} on {m.index}"
    if isinstance(m, RouteMsg):
        return f"{verb} default route via {m.gateway or '-'} dev {m.oif} src {m.prefsrc or '-'}"
    return f"link {m.index} {'up' if m.flags & IFF_UP else 'down'}" if m.new else f"link {m.index} removed"


__all__ = ["DEBOUNCE", "AddrMsg", "LinkMsg", "NetState", "NetWatcher", "RouteMsg", "dump", "parse"]
