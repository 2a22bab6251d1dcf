"""Links, addresses and routes through pyroute2's synchronous IPRoute.

pyroute2's asyncio API does not work under uvloop, so these are plain blocking calls: use them
before the loop starts, or wrap them in ``asyncio.to_thread`` (the ``a*`` helpers do).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
from collections.abc import Iterable

from pyroute2 import IPRoute  # type: ignore[import-untyped]
from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

log = logging.getLogger(__name__)

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class NetlinkFailure(OSError):
    """A netlink request failed; the message names the operation."""


def _index(ipr: IPRoute, name: str) -> int:
    idx = ipr.link_lookup(ifname=name)
    if not idx:
        raise NetlinkFailure(errno.ENODEV, f"no such interface: {name}")
    return int(idx[0])


def configure_interface(name: str, *, mtu: int, addresses: Iterable[IPInterface] = (),
                        routes: Iterable[IPNetwork] = (), txqueuelen: int | None = None) -> None:
    """Set MTU (and queue length), add addresses, bring the link up, then add routes to it
    (existing ones are kept)."""
    with IPRoute() as ipr:
        idx = _index(ipr, name)
        try:
            if txqueuelen:
                ipr.link("set", index=idx, mtu=mtu, txqlen=txqueuelen)
            else:
                ipr.link("set", index=idx, mtu=mtu)
            for a in addresses:
                try:
                    ipr.addr("add", index=idx, address=str(a.ip), prefixlen=a.network.prefixlen)
                except NetlinkError as e:
                    if e.code != errno.EEXIST:
                        raise
            ipr.link("set", index=idx, state="up")
            for r in routes:
                family = 10 if r.version == 6 else 2
                try:
                    ipr.route("add", dst=str(r.network_address), dst_len=r.prefixlen, oif=idx,
                              family=family)
                except NetlinkError as e:
                    if e.code != errno.EEXIST:
                        raise
                    log.debug("route exists", extra={"route": str(r)})
        except NetlinkError as e:
            raise NetlinkFailure(e.code, f"configuring {name}: {e}") from None


def delete_link(name: str) -> bool:
    """Remove interface ``name``; False if it was already gone."""
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=name)
        if not idx:
            return False
        try:
            ipr.link("del", index=idx[0])
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                return False
            raise NetlinkFailure(e.code, f"deleting {name}: {e}") from None
        return True


def link_exists(name: str) -> bool:
    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=name))


async def aconfigure_interface(name: str, **kw: object) -> None:
    await asyncio.to_thread(configure_interface, name, **kw)  # type: ignore[arg-type]


async def adelete_link(name: str) -> bool:
    return await asyncio.to_thread(delete_link, name)
