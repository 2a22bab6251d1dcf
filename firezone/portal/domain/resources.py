"""Resource validation and normalization (pure).

Rules (DESIGN.md "Resources and policies"):

- ``type`` is one of ``ip``, ``cidr``, ``dns``, ``internet``; when omitted it is inferred from the
  address (:func:`infer_type`), never as ``internet``.
- ``ip``: one IPv4 or IPv6 address (a ``/32`` or ``/128`` suffix is accepted and dropped).
- ``cidr``: a network; host bits are *normalized away* (``10.1.2.3/8`` becomes ``10.0.0.0/8``), and
  a bare address becomes a ``/32`` or ``/128``.
- ``ip`` and ``cidr`` must not be a full tunnel (``0.0.0.0/0``, ``::/0``: that is the internet
  resource), must not touch loopback, the unspecified address, or the tunnel ranges
  ``100.64.0.0/10`` and ``fd00:2021:1111::/48``.
- ``dns``: a pattern accepted by :func:`firezone.proto.dns.patterns.validate_pattern`.
- ``internet``: no address.
- ``name``: 1..255 characters after trimming; ``address_description``: at most 255 (empty = none).
- ``filters``: a list of ``{"protocol": "tcp"|"udp"|"icmp", "ports": [...]}`` (or CLI strings,
  see :func:`parse_filter_spec`); empty list = everything allowed; empty ``ports`` = all ports of
  that protocol; ports 1..65535, ranges ``lo-hi`` with lo <= hi; ICMP takes no ports.
  Normalization merges entries of the same protocol, sorts and merges overlapping or adjacent
  ranges, and writes ``"80-80"`` as ``"80"``. Name uniqueness is the store's job.

Every error is a :class:`ValidationError` naming the field (``address``, ``filters[1].ports[0]``…).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from typing import Any

from firezone.proto.dns.patterns import validate_pattern

__all__ = [
    "PROTOCOLS",
    "RESOURCE_TYPES",
    "ValidationError",
    "filters_to_wire",
    "infer_type",
    "normalize_filters",
    "parse_filter_spec",
    "validate_resource",
]

RESOURCE_TYPES = ("ip", "cidr", "dns", "internet")
_DIGITS = re.compile(r"[0-9]{1,6}")
PROTOCOLS = ("tcp", "udp", "icmp")
MAX_NAME_LEN = 255
MAX_DESCRIPTION_LEN = 255

RESERVED_V4 = ipaddress.IPv4Network("100.64.0.0/10")
RESERVED_V6 = ipaddress.IPv6Network("fd00:2021:1111::/48")
LOOPBACK_V4 = ipaddress.IPv4Network("127.0.0.0/8")
LOOPBACK_V6 = ipaddress.IPv6Network("::1/128")


class ValidationError(ValueError):
    """A user-input error on one field; ``str(e) == f"{field}: {message}"``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def infer_type(address: str) -> str:
    """Guess a resource type from its address: ``ip``, ``cidr`` or ``dns``."""
    text = address.strip()
    try:
        ipaddress.ip_address(text)
        return "ip"
    except ValueError:
        pass
    if "/" in text:
        try:
            ipaddress.ip_network(text, strict=False)
            return "cidr"
        except ValueError:
            pass
    return "dns"


def _check_network(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> None:
    net = network
    shown = str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
    if net.prefixlen == 0:
        raise ValidationError(
            "address",
            f"{shown} is a full tunnel; use the internet resource to route all traffic",
        )
    if isinstance(net, ipaddress.IPv4Network):
        if net.overlaps(LOOPBACK_V4):
            raise ValidationError("address", f"{shown} includes loopback addresses ({LOOPBACK_V4})")
        if net.overlaps(RESERVED_V4):
            raise ValidationError(
                "address", f"{shown} overlaps the reserved tunnel range {RESERVED_V4}"
            )
        if net == ipaddress.IPv4Network("0.0.0.0/32"):
            raise ValidationError("address", "0.0.0.0 is the unspecified address")
        return
    if net.overlaps(LOOPBACK_V6):
        raise ValidationError("address", f"{shown} includes loopback addresses ({LOOPBACK_V6})")
    if net.overlaps(RESERVED_V6):
        raise ValidationError(
            "address", f"{shown} overlaps the reserved tunnel range {RESERVED_V6}"
        )
    if net == ipaddress.IPv6Network("::/128"):
        raise ValidationError("address", ":: is the unspecified address")
    mapped = net.network_address.ipv4_mapped
    if mapped is not None and net.prefixlen >= 96:
        v4 = ipaddress.IPv4Network((mapped, net.prefixlen - 96), strict=False)
        if v4.overlaps(LOOPBACK_V4) or v4.overlaps(RESERVED_V4):
            raise ValidationError("address", f"{shown} maps to {v4}, which is loopback or reserved")


def _reject_port_or_zone(text: str) -> None:
    if "%" in text:
        raise ValidationError("address", "must not contain an IPv6 zone index ('%')")
    if text.count(":") == 1 or (text.startswith("[") and "]:" in text):
        raise ValidationError("address", "must not contain a port")


def _validate_ip(text: str) -> str:
    _reject_port_or_zone(text)
    bare = text
    if "/" in text:
        bare, _, plen = text.partition("/")
        try:
            addr = ipaddress.ip_address(bare)
        except ValueError:
            raise ValidationError("address", f"{text!r} is not an IP address") from None
        if not _DIGITS.fullmatch(plen) or int(plen) > addr.max_prefixlen:
            raise ValidationError("address", f"{text!r} has an invalid prefix length")
        if int(plen) != addr.max_prefixlen:
            raise ValidationError("address", f"{text!r} is a network; use a resource of type cidr")
    try:
        addr = ipaddress.ip_address(bare)
    except ValueError:
        raise ValidationError("address", f"{text!r} is not a single IPv4 or IPv6 address") from None
    _check_network(ipaddress.ip_network(addr))
    return str(addr)


def _validate_cidr(text: str) -> str:
    _reject_port_or_zone(text)
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValidationError(
            "address", f"{text!r} is not an IPv4 or IPv6 network in CIDR notation"
        ) from None
    _check_network(net)
    return str(net)


def _parse_port(value: object, field: str) -> int:
    if isinstance(value, bool):
        raise ValidationError(field, f"{value!r} is not a port number")
    if isinstance(value, int):
        port = value
    elif isinstance(value, str) and _DIGITS.fullmatch(value.strip()):
        port = int(value.strip())
    else:
        raise ValidationError(field, f"{value!r} is not a port number")
    if not 1 <= port <= 65535:
        raise ValidationError(field, f"port {port} is outside 1-65535")
    return port


def _parse_port_range(value: object, field: str) -> tuple[int, int]:
    if isinstance(value, str) and "-" in value:
        lo_text, _, hi_text = value.partition("-")
        lo = _parse_port(lo_text, field)
        hi = _parse_port(hi_text, field)
        if lo > hi:
            raise ValidationError(field, f"range {value!r} starts after it ends")
        return lo, hi
    port = _parse_port(value, field)
    return port, port


def _merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def _format_range(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


def normalize_filters(filters: object, field: str = "filters") -> list[dict[str, Any]]:
    """Validate and normalize a filter list (see the module docstring)."""
    if filters is None:
        return []
    if not isinstance(filters, list | tuple):
        raise ValidationError(field, "must be a list")
    # protocol -> None (all ports) or list of ranges
    by_proto: dict[str, list[tuple[int, int]] | None] = {}
    for i, item in enumerate(filters):
        here = f"{field}[{i}]"
        if isinstance(item, str):
            try:
                item = parse_filter_spec(item)
            except ValidationError as e:
                raise ValidationError(here, e.message) from None
        if not isinstance(item, Mapping):
            raise ValidationError(here, "must be an object with 'protocol' and 'ports'")
        unknown = set(item) - {"protocol", "ports"}
        if unknown:
            raise ValidationError(here, f"unknown key(s): {', '.join(sorted(unknown))}")
        proto = item.get("protocol")
        if not isinstance(proto, str) or proto.lower() not in PROTOCOLS:
            raise ValidationError(
                f"{here}.protocol", f"must be one of tcp, udp, icmp, not {proto!r}"
            )
        proto = proto.lower()
        ports = item.get("ports") or []
        if isinstance(ports, str | int):
            ports = [ports]
        if not isinstance(ports, list | tuple):
            raise ValidationError(f"{here}.ports", "must be a list of ports or port ranges")
        if proto == "icmp":
            if ports:
                raise ValidationError(f"{here}.ports", "icmp has no ports")
            by_proto["icmp"] = None
            continue
        ranges = [_parse_port_range(p, f"{here}.ports[{j}]") for j, p in enumerate(ports)]
        if not ranges:
            by_proto[proto] = None
        elif proto not in by_proto:
            by_proto[proto] = ranges
        else:
            existing = by_proto[proto]
            if existing is not None:
                existing.extend(ranges)
    out: list[dict[str, Any]] = []
    for proto in PROTOCOLS:
        if proto not in by_proto:
            continue
        ranges_or_all = by_proto[proto]
        ports_out = (
            []
            if ranges_or_all is None
            else [_format_range(lo, hi) for lo, hi in _merge_ranges(ranges_or_all)]
        )
        out.append({"protocol": proto, "ports": ports_out})
    return out


def parse_filter_spec(spec: str) -> dict[str, Any]:
    """Parse a CLI filter: ``tcp``, ``tcp/80``, ``udp/1000-2000``, ``tcp/80,443``, ``icmp``.

    Returns a normalized ``{"protocol", "ports"}``; raises :class:`ValidationError` (field
    ``filters``).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValidationError("filters", "empty filter; use e.g. tcp/443, udp/1000-2000 or icmp")
    proto, sep, ports_text = spec.strip().partition("/")
    proto = proto.strip().lower()
    if proto not in PROTOCOLS:
        raise ValidationError(
            "filters", f"unknown protocol {proto!r} in {spec!r}; use tcp, udp or icmp"
        )
    if sep and not ports_text.strip():
        raise ValidationError("filters", f"no ports after '/' in {spec!r}")
    if proto == "icmp" and sep:
        raise ValidationError("filters", "icmp has no ports")
    ports = [p.strip() for p in ports_text.split(",")] if sep else []
    if any(not p for p in ports):
        raise ValidationError("filters", f"empty port in {spec!r}")
    ranges = [_parse_port_range(p, "filters") for p in ports]
    return {
        "protocol": proto,
        "ports": [_format_range(lo, hi) for lo, hi in _merge_ranges(ranges)],
    }


def filters_to_wire(filters: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Expand normalized filters into the gateway/client JSON form, one object per port range.

    TCP/UDP without ports become ``0..65535``; ICMP is ``{"protocol": "icmp"}``.
    """
    wire: list[dict[str, Any]] = []
    for f in filters:
        proto = f["protocol"]
        if proto == "icmp":
            wire.append({"protocol": "icmp"})
            continue
        ports = f.get("ports") or []
        if not ports:
            wire.append({"protocol": proto, "port_range_start": 0, "port_range_end": 65535})
            continue
        for p in ports:
            lo, hi = _parse_port_range(p, "filters")
            wire.append({"protocol": proto, "port_range_start": lo, "port_range_end": hi})
    return wire


def _validate_text(value: object, field: str, *, required: bool, limit: int) -> str | None:
    if value is None:
        if required:
            raise ValidationError(field, "is required")
        return None
    if not isinstance(value, str):
        raise ValidationError(field, "must be a string")
    text = value.strip()
    if not text:
        if required:
            raise ValidationError(field, "must not be empty")
        return None
    if len(text) > limit:
        raise ValidationError(field, f"must be at most {limit} characters (got {len(text)})")
    return text


def validate_resource(
    *,
    type: str | None,
    address: str | None,
    name: str,
    address_description: str | None = None,
    filters: list[Any] | None = None,
) -> dict[str, Any]:
    """Validate a resource and return ``{type, address, name, address_description, filters}``.

    Raises :class:`ValidationError` naming the first offending field.
    """
    if address is not None and not isinstance(address, str):
        raise ValidationError("address", "must be a string")
    addr = address.strip() if address is not None else None
    if type is None:
        if not addr:
            raise ValidationError("address", "is required (or give type internet)")
        rtype = infer_type(addr)
    else:
        if not isinstance(type, str) or type.lower() not in RESOURCE_TYPES:
            raise ValidationError(
                "type", f"must be one of {', '.join(RESOURCE_TYPES)}, not {type!r}"
            )
        rtype = type.lower()
    norm_addr: str | None
    if rtype == "internet":
        if addr:
            raise ValidationError(
                "address", "must be empty: the internet resource routes 0.0.0.0/0 and ::/0"
            )
        norm_addr = None
    elif not addr:
        raise ValidationError("address", f"is required for a {rtype} resource")
    elif rtype == "ip":
        norm_addr = _validate_ip(addr)
    elif rtype == "cidr":
        norm_addr = _validate_cidr(addr)
    else:
        try:
            norm_addr = validate_pattern(addr)
        except ValueError as e:
            raise ValidationError("address", str(e)) from None
    norm_name = _validate_text(name, "name", required=True, limit=MAX_NAME_LEN)
    description = _validate_text(
        address_description, "address_description", required=False, limit=MAX_DESCRIPTION_LEN
    )
    return {
        "type": rtype,
        "address": norm_addr,
        "name": norm_name,
        "address_description": description,
        "filters": normalize_filters(filters),
    }
