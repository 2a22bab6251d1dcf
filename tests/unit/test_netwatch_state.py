"""netwatch: rtnetlink message parsing and the mirror that tells changes from noise (no sockets)."""

from __future__ import annotations

import ipaddress
import socket
import struct

from hypothesis import given
from hypothesis import strategies as st

from firezone.runtime import netwatch as nw

ETH, TUN, LO = 2, 7, 1
NAMES = {ETH: "eth0", TUN: "tun-firezone", LO: "lo"}


def _attr(kind: int, value: bytes) -> bytes:
    length = 4 + len(value)
    return struct.pack("=HH", length, kind) + value + b"\0" * ((4 - length % 4) % 4)


def _msg(mtype: int, body: bytes, flags: int = 0) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), mtype, flags, 0, 0) + body


def addr(new: bool, address: str, plen: int, index: int = ETH, *, scope: int = 0, flags: int = 0,
         ext_flags: int | None = None) -> bytes:
    ip = ipaddress.ip_address(address)
    fam = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    body = struct.pack("=BBBBI", fam, plen, flags & 0xFF, scope, index)
    body += _attr(nw.IFA_ADDRESS, ip.packed)
    if ip.version == 4:
        body += _attr(nw.IFA_LOCAL, ip.packed)
    if ext_flags is not None:
        body += _attr(nw.IFA_FLAGS, struct.pack("=I", ext_flags))
    return _msg(nw.RTM_NEWADDR if new else nw.RTM_DELADDR, body)


def route(new: bool, gateway: str | None, oif: int = ETH, *, dst: str | None = None, dst_len: int = 0,
          prefsrc: str | None = None, table: int = 254, priority: int | None = None,
          replace: bool = False, family: int = socket.AF_INET) -> bytes:
    body = struct.pack("=BBBBBBBBI", family, dst_len, 0, 0, table if table < 256 else 252, 3, 0, 1, 0)
    if dst is not None:
        body += _attr(nw.RTA_DST, ipaddress.ip_address(dst).packed)
    if table >= 256:
        body += _attr(nw.RTA_TABLE, struct.pack("=I", table))
    body += _attr(nw.RTA_OIF, struct.pack("=I", oif))
    if gateway is not None:
        body += _attr(nw.RTA_GATEWAY, ipaddress.ip_address(gateway).packed)
    if prefsrc is not None:
        body += _attr(nw.RTA_PREFSRC, ipaddress.ip_address(prefsrc).packed)
    if priority is not None:
        body += _attr(nw.RTA_PRIORITY, struct.pack("=I", priority))
    return _msg(nw.RTM_NEWROUTE if new else nw.RTM_DELROUTE, body, nw.NLM_F_REPLACE if replace else 0)


def link(new: bool, index: int, name: str, up: bool) -> bytes:
    body = struct.pack("=BxHiII", 0, 1, index, nw.IFF_UP if up else 0, 0)
    body += _attr(nw.IFLA_IFNAME, name.encode() + b"\0")
    return _msg(nw.RTM_NEWLINK if new else nw.RTM_DELLINK, body)


def feed(state: nw.NetState, *datagrams: bytes) -> list[bool]:
    out = []
    for d in datagrams:
        for m in nw.parse(d):
            assert not isinstance(m, str)
            out.append(state.apply(m, NAMES.get))
    return out


def lab_state() -> nw.NetState:
    s = nw.NetState(["lo", "tun-firezone"])
    feed(s, addr(True, "192.0.2.10", 25), addr(True, "2001:db8:2::10", 64),
         route(True, "192.0.2.1"), route(True, "2001:db8:2::1", family=socket.AF_INET6, priority=1024))
    return s


def test_parse_reads_every_field():
    [a] = nw.parse(addr(True, "192.0.2.10", 25, scope=0, ext_flags=0x80))
    assert a == nw.AddrMsg(True, socket.AF_INET, ETH, "192.0.2.10", 25, 0, 0x80)
    [r] = nw.parse(route(False, "192.0.2.1", prefsrc="192.0.2.12", priority=5, replace=True))
    assert r == nw.RouteMsg(False, True, socket.AF_INET, 254, 0, 0, 1, ETH, "192.0.2.1", "192.0.2.12", 5)
    [lk] = nw.parse(link(True, 9, "wlan0", up=False))
    assert lk == nw.LinkMsg(True, 9, "wlan0", 0)
    done = struct.pack("=IHHII", 20, nw.NLMSG_DONE, 2, 1, 0) + b"\0" * 4
    assert list(nw.parse(addr(True, "192.0.2.10", 25) + done)) == [
        nw.AddrMsg(True, socket.AF_INET, ETH, "192.0.2.10", 25, 0, 0), "done"]


def test_new_and_deleted_addresses_are_changes_refreshes_are_not():
    s = lab_state()
    assert feed(s, addr(True, "192.0.2.12", 25)) == [True]
    assert feed(s, addr(True, "192.0.2.12", 25)) == [False]  # lifetime refresh
    assert feed(s, addr(False, "192.0.2.10", 25)) == [True]
    assert feed(s, addr(False, "192.0.2.10", 25)) == [False]


def test_ignored_devices_loopback_and_link_local_addresses_are_noise():
    s = lab_state()
    assert feed(s, addr(True, "100.64.0.3", 32, TUN), addr(False, "100.64.0.3", 32, TUN)) == [False, False]
    assert feed(s, addr(True, "127.0.0.2", 8, LO, scope=254)) == [False]
    assert feed(s, addr(True, "fe80::1", 64, scope=253)) == [False]
    assert feed(s, route(True, None, TUN), route(False, None, TUN)) == [False, False]  # Internet resource


def test_tentative_ipv6_address_counts_once_usable():
    s = lab_state()
    assert feed(s, addr(True, "2001:db8:2::12", 64, flags=nw.IFA_F_TENTATIVE)) == [False]
    assert feed(s, addr(True, "2001:db8:2::12", 64)) == [True]  # DAD done
    assert feed(s, addr(True, "2001:db8:2::13", 64, ext_flags=nw.IFA_F_DADFAILED)) == [False]


def test_only_default_routes_of_the_main_table_count():
    s = lab_state()
    assert feed(s, route(True, "192.0.2.1", dst="10.0.0.0", dst_len=8)) == [False]
    assert feed(s, route(True, "192.0.2.1", table=1000)) == [False]
    assert feed(s, route(True, "192.0.2.1")) == [False]  # the same default route again
    assert feed(s, route(True, "192.0.2.1", prefsrc="192.0.2.12", replace=True)) == [True]
    assert len(s.routes) == 2  # the replaced IPv4 route is gone, IPv6 stays
    assert feed(s, route(False, "192.0.2.1", prefsrc="192.0.2.12")) == [True]
    assert feed(s, route(False, "192.0.2.1", prefsrc="192.0.2.12")) == [False]


def test_link_down_drops_its_default_routes():
    s = lab_state()
    assert feed(s, link(True, ETH, "eth0", up=True)) == [False]
    assert feed(s, link(True, ETH, "eth0", up=False)) == [True]
    assert s.routes == set()
    assert feed(s, link(True, ETH, "eth0", up=False)) == [False]


def test_names_come_from_link_messages_so_a_deleted_tun_stays_ignored():
    s = nw.NetState(["tun-firezone"])
    feed(s, link(True, 42, "tun-firezone", up=True))
    # The device is gone by the time its address deletion is read: the name is remembered.
    msgs = list(nw.parse(addr(False, "100.64.0.3", 32, 42)))
    assert s.apply(msgs[0], lambda _i: None) is False  # type: ignore[arg-type]
    msgs = list(nw.parse(addr(True, "100.64.0.3", 32, 42)))
    assert s.apply(msgs[0], lambda _i: None) is False  # type: ignore[arg-type]


@given(st.binary(max_size=300))
def test_parse_never_raises(data):
    for m in nw.parse(data):
        if not isinstance(m, str):
            nw.NetState().apply(m)
