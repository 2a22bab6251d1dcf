"""Account settings that reach every client (pure validation).

- ``search_domain``: a DNS name (letters, digits, hyphens; labels of 1..63 characters, at least
  two labels, at most 253 characters in all); stored lowercase without a trailing dot. The
  client adds it to the system resolver's search list and answers short names of resources
  with it (``gitlab`` -> ``gitlab.corp.example``). ``None`` or ``""`` removes it.
- ``upstream_dns``: at most :data:`MAX_UPSTREAMS` resolvers, each an IP address with an optional
  port (``192.0.2.53``, ``192.0.2.53:5353``, ``2001:db8::53``, ``[2001:db8::53]:5353``), stored
  as written by :func:`format_upstream`. The client forwards names that are no resource there
  instead of to the resolvers the machine had. ``[]`` or ``None`` means "the machine's own".

Errors are :class:`ValidationError` naming the field (``search_domain``, ``upstream_dns[1]``).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from firezone.portal.domain.resources import ValidationError
from firezone.proto.ip import parse_hostport

MAX_UPSTREAMS = 8
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def validate_search_domain(value: object) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValidationError("search_domain", "must be a string")
    name = value.strip().lower().rstrip(".")
    labels = name.split(".")
    if len(name) > 253 or len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        raise ValidationError("search_domain", f"{value!r} is not a domain name like corp.example.com")
    if labels[-1].isdigit():
        raise ValidationError("search_domain", f"{value!r} is not a domain name (the last label is a number)")
    return name


def format_upstream(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
    if port == 53:
        return str(ip)
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _upstream(value: object, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(field, "must be an IP address, optionally with :port")
    try:
        host, port = parse_hostport(value)
    except ValueError:
        raise ValidationError(field, f"{value!r} is not an IP address with an optional port 1-65535") from None
    ip = ipaddress.ip_address(host)
    if ip.is_unspecified or ip.is_multicast:
        raise ValidationError(field, f"{ip} cannot be a resolver")
    return format_upstream(ip, port)


def validate_upstream_dns(value: object) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValidationError("upstream_dns", "must be a list of IP addresses")
    if len(value) > MAX_UPSTREAMS:
        raise ValidationError("upstream_dns", f"at most {MAX_UPSTREAMS} resolvers")
    out = [_upstream(v, f"upstream_dns[{i}]") for i, v in enumerate(value)]
    return list(dict.fromkeys(out))


def validate_settings(changes: dict[str, Any]) -> dict[str, Any]:
    """The validated form of a partial settings update (only the keys given)."""
    out: dict[str, Any] = {}
    if "search_domain" in changes:
        out["search_domain"] = validate_search_domain(changes["search_domain"])
    if "upstream_dns" in changes:
        out["upstream_dns"] = validate_upstream_dns(changes["upstream_dns"])
    return out
