"""Tunnel address allocation for devices (pure; randomness is injected).

Each client and gateway gets one address from ``100.64.0.0/11`` and one from
``fd00:2021:1111::/107``, unique per account: pick a random offset in the range, then probe
linearly (wrapping around) for the first address that is neither taken nor the first or last
address of the range (network and broadcast in IPv4; kept free in IPv6 as well so both families
behave alike).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection

from firezone.proto.rng import Rng

__all__ = [
    "IPV4_TUNNEL",
    "IPV6_TUNNEL",
    "AddressPoolExhausted",
    "allocate_ip",
    "allocate_pair",
]

IPV4_TUNNEL = "100.64.0.0/11"
IPV6_TUNNEL = "fd00:2021:1111::/107"


class AddressPoolExhausted(RuntimeError):
    """Every usable address of the range is taken."""


def allocate_ip(network: str, used: Collection[str], rng: Rng) -> str:
    """Return a free address of ``network`` as a normalized string.

    ``used`` holds the taken addresses in normalized (``str(ipaddress.ip_address(...))``) form.
    Raises :class:`AddressPoolExhausted` when none is left and ``ValueError`` for a bad network.
    """
    net = ipaddress.ip_network(network, strict=True)
    usable = net.num_addresses - 2
    if usable <= 0:
        raise ValueError(f"{network} has no usable addresses")
    taken = sum(1 for u in used if _in(net, u)) if len(used) >= usable else 0
    if taken >= usable:
        raise AddressPoolExhausted(f"no free address left in {network}")
    base = int(net.network_address)
    cls = type(net.network_address)
    start = rng.randbelow(usable)
    for i in range(usable):
        offset = 1 + (start + i) % usable
        candidate = str(cls(base + offset))
        if candidate not in used:
            return candidate
    raise AddressPoolExhausted(f"no free address left in {network}")


def _in(net: ipaddress.IPv4Network | ipaddress.IPv6Network, text: str) -> bool:
    try:
        return ipaddress.ip_address(text) in net
    except ValueError:
        return False


def allocate_pair(used_v4: Collection[str], used_v6: Collection[str], rng: Rng) -> tuple[str, str]:
    """Allocate one IPv4 and one IPv6 tunnel address from the standard ranges."""
    return allocate_ip(IPV4_TUNNEL, used_v4, rng), allocate_ip(IPV6_TUNNEL, used_v6, rng)
