"""Parse wg-quick style WireGuard configuration files (pure: text in, dataclasses out).

The format is the one ``wg-quick(8)`` reads: an ``[Interface]`` section (PrivateKey, ListenPort,
Address, MTU, plus wg-quick's DNS/Table/FwMark/SaveConfig/Pre*/Post* keys, which are kept but not
acted on) and any number of ``[Peer]`` sections (PublicKey, PresharedKey, Endpoint, AllowedIPs,
PersistentKeepalive). Keys are case-insensitive, ``#`` starts a comment, list values are
comma-separated and a key may repeat to extend its list. Every error names the line and key:
``line 7: key 'AllowedIPs': '10.0.0.0/33' is not an IP network``.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

KEY_LEN = 32


class WgConfigError(ValueError):
    """A configuration file is malformed; ``line`` and ``key`` say where."""

    def __init__(self, message: str, *, line: int | None = None, key: str | None = None,
                 source: str | None = None) -> None:
        self.line = line
        self.key = key
        self.source = source
        self.reason = message
        where = []
        if source:
            where.append(source)
        if line is not None:
            where.append(f"line {line}")
        if key is not None:
            where.append(f"key '{key}'")
        super().__init__(": ".join([*where, message]))


@dataclass
class PeerConfig:
    public_key: bytes
    preshared_key: bytes | None = None
    endpoint: tuple[str, int] | None = None
    allowed_ips: list[IPNetwork] = field(default_factory=list)
    persistent_keepalive: int | None = None
    line: int = 0


@dataclass
class WgConfig:
    private_key: bytes
    listen_port: int | None = None
    addresses: list[IPInterface] = field(default_factory=list)
    mtu: int | None = None
    fwmark: int | None = None
    dns: list[str] = field(default_factory=list)
    peers: list[PeerConfig] = field(default_factory=list)
    # wg-quick keys that fz accepts but does not act on (Table, SaveConfig, PreUp, ...): (line, key)
    ignored: list[tuple[int, str]] = field(default_factory=list)


def decode_key(text: str) -> bytes:
    """Decode a base64 WireGuard key (44 characters, 32 bytes), as ``wg`` writes it."""
    s = text.strip()
    if len(s) != 44 or s[43] != "=":
        raise ValueError("not a WireGuard key (expected 44 base64 characters ending in '=')")
    try:
        raw = base64.b64decode(s, validate=True)
    except binascii.Error:
        raise ValueError("not a WireGuard key (invalid base64)") from None
    if len(raw) != KEY_LEN:
        raise ValueError("not a WireGuard key (does not decode to 32 bytes)")
    return raw


def encode_key(raw: bytes) -> str:
    """Encode a 32-byte key as base64, the way ``wg`` prints it."""
    if len(raw) != KEY_LEN:
        raise ValueError("a WireGuard key is 32 bytes")
    return base64.b64encode(raw).decode("ascii")


def parse_endpoint(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6addr]:port`` -> (host, port); the host may be a name."""
    s = text.strip()
    if s.startswith("["):
        end = s.find("]")
        if end < 0 or not s[end + 1:].startswith(":"):
            raise ValueError(f"{s!r} is not host:port (IPv6 as [addr]:port)")
        host, port_s = s[1:end], s[end + 2:]
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_s = s.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{s!r} is not host:port")
        if ":" in host:
            raise ValueError(f"{s!r}: write an IPv6 endpoint as [addr]:port")
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError(f"port {port_s!r} is not in 1..65535")
    return host, int(port_s)


def _split_list(value: str) -> list[str]:
    items = [v.strip() for v in value.split(",")]
    if any(not v for v in items):
        raise ValueError("empty item in a comma-separated list")
    return items


def _int_in(lo: int, hi: int, what: str) -> Callable[[str], int]:
    def conv(v: str) -> int:
        s = v.strip()
        try:
            n = int(s, 0) if s.lower().startswith("0x") else int(s, 10)
        except ValueError:
            raise ValueError(f"{s!r} is not a number") from None
        if not lo <= n <= hi:
            raise ValueError(f"{what} {n} is not in {lo}..{hi}")
        return n
    return conv


def _network(v: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(v, strict=False)
    except ValueError:
        raise ValueError(f"{v!r} is not an IP network") from None


def _interface(v: str) -> IPInterface:
    try:
        return ipaddress.ip_interface(v)
    except ValueError:
        raise ValueError(f"{v!r} is not an IP address with optional /prefix") from None


_IGNORED_INTERFACE_KEYS = {"table", "saveconfig", "preup", "postup", "predown", "postdown"}
_CANONICAL = {
    "privatekey": "PrivateKey", "listenport": "ListenPort", "address": "Address", "mtu": "MTU",
    "fwmark": "FwMark", "dns": "DNS", "table": "Table", "saveconfig": "SaveConfig",
    "preup": "PreUp", "postup": "PostUp", "predown": "PreDown", "postdown": "PostDown",
    "publickey": "PublicKey", "presharedkey": "PresharedKey", "endpoint": "Endpoint",
    "allowedips": "AllowedIPs", "persistentkeepalive": "PersistentKeepalive",
}


def parse(text: str, *, source: str | None = None) -> WgConfig:
    """Parse the text of a wg-quick configuration file; raises :class:`WgConfigError`."""
    iface: dict[str, object] = {}
    iface_line: int | None = None
    peers: list[tuple[int, int, dict[str, object]]] = []  # (line, section id, values)
    line_of: dict[tuple[int, str], int] = {}
    section: str | None = None
    seen_single: set[tuple[int, str]] = set()
    ignored: list[tuple[int, str]] = []
    section_id = 0

    def err(msg: str, line: int | None = None, key: str | None = None) -> WgConfigError:
        return WgConfigError(msg, line=line, key=key, source=source)

    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise err(f"malformed section header {line!r}", lineno)
            name = line[1:-1].strip().lower()
            if name == "interface":
                if iface_line is not None:
                    raise err(f"second [Interface] section (first on line {iface_line})", lineno)
                iface_line = lineno
                section = "interface"
            elif name == "peer":
                peers.append((lineno, section_id + 1, {}))
                section = "peer"
            else:
                raise err(f"unknown section [{line[1:-1].strip()}] (expected [Interface] or [Peer])",
                          lineno)
            section_id += 1
            continue
        key_raw, sep, value = line.partition("=")
        key_raw = key_raw.strip()
        value = value.strip()
        if not sep or not key_raw or any(c.isspace() for c in key_raw):
            raise err(f"expected 'Key = Value', got {line!r}", lineno)
        lkey = key_raw.lower()
        key = _CANONICAL.get(lkey, key_raw)
        if section is None:
            raise err("key outside of any [Interface] or [Peer] section", lineno, key)
        try:
            if section == "interface":
                target = iface
                if lkey == "privatekey":
                    val: object = decode_key(value)
                elif lkey == "listenport":
                    val = _int_in(0, 65535, "port")(value)
                elif lkey == "address":
                    val = [_interface(v) for v in _split_list(value)]
                elif lkey == "mtu":
                    val = _int_in(576, 65535, "MTU")(value)
                elif lkey == "fwmark":
                    val = 0 if value.lower() == "off" else _int_in(0, 2**32 - 1, "fwmark")(value)
                elif lkey == "dns":
                    val = _split_list(value)
                elif lkey in _IGNORED_INTERFACE_KEYS:
                    ignored.append((lineno, key))
                    continue
                else:
                    raise err("unknown key in [Interface]", lineno, key_raw)
            else:
                target = peers[-1][2]
                if lkey == "publickey" or lkey == "presharedkey":
                    val = decode_key(value)
                elif lkey == "endpoint":
                    val = parse_endpoint(value)
                elif lkey == "allowedips":
                    val = [_network(v) for v in _split_list(value)] if value else []
                elif lkey == "persistentkeepalive":
                    val = None if value.lower() == "off" else _int_in(0, 65535, "interval")(value)
                    if val == 0:
                        val = None
                else:
                    raise err("unknown key in [Peer]", lineno, key_raw)
        except WgConfigError:
            raise
        except ValueError as e:
            raise err(str(e), lineno, key) from None
        if isinstance(val, list):
            existing = target.get(key)
            target[key] = [*existing, *val] if isinstance(existing, list) else val
        else:
            if (section_id, key) in seen_single:
                raise err("given twice in the same section", lineno, key)
            seen_single.add((section_id, key))
            target[key] = val
        line_of[(section_id, key)] = lineno

    if iface_line is None:
        raise err("no [Interface] section")
    if "PrivateKey" not in iface:
        raise err("[Interface] has no PrivateKey", iface_line, "PrivateKey")
    cfg = WgConfig(
        private_key=iface["PrivateKey"],  # type: ignore[arg-type]
        listen_port=iface.get("ListenPort"),  # type: ignore[arg-type]
        addresses=iface.get("Address", []),  # type: ignore[arg-type]
        mtu=iface.get("MTU"),  # type: ignore[arg-type]
        fwmark=iface.get("FwMark"),  # type: ignore[arg-type]
        dns=iface.get("DNS", []),  # type: ignore[arg-type]
        ignored=ignored,
    )
    seen_keys: dict[bytes, int] = {}
    for lineno, sid, p in peers:
        if "PublicKey" not in p:
            raise err("[Peer] has no PublicKey", lineno, "PublicKey")
        pk: bytes = p["PublicKey"]  # type: ignore[assignment]
        pk_line = line_of[(sid, "PublicKey")]
        if pk in seen_keys:
            raise err(f"the same peer is already defined on line {seen_keys[pk]}", pk_line, "PublicKey")
        seen_keys[pk] = pk_line
        cfg.peers.append(PeerConfig(
            public_key=pk,
            preshared_key=p.get("PresharedKey"),  # type: ignore[arg-type]
            endpoint=p.get("Endpoint"),  # type: ignore[arg-type]
            allowed_ips=p.get("AllowedIPs", []),  # type: ignore[arg-type]
            persistent_keepalive=p.get("PersistentKeepalive"),  # type: ignore[arg-type]
            line=lineno,
        ))
    return cfg
