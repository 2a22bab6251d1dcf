"""IPv4/IPv6 packets with TCP, UDP, ICMP and ICMPv6: parse, build, checksum, rewrite in place.

``parse(data)`` returns a :class:`Packet` (a view over a ``bytearray`` with the header offsets
worked out once) or ``None`` for anything that is not a well-formed IP packet; it never raises.
Fields are read lazily from the buffer. The ``set_*`` methods rewrite an address, port or ICMP
identifier in place and patch every affected checksum incrementally (RFC 1624 eqn. 3), so
translating a packet costs a few slice assignments and no full recomputation.

Checksum arithmetic uses the identity 2**16 ≡ 1 (mod 0xFFFF): the one's-complement sum of the
16-bit words of ``data`` is ``int.from_bytes(data) % 0xFFFF`` (0 meaning 0xFFFF when the data is not
all zeros), which lets CPython do the work in C.

Also here: ICMP/ICMPv6 "destination unreachable" builders quoting the offending packet, and the
peer-to-peer control packet that client and gateway exchange through the tunnel (firezone-notes §3.5).
"""

from __future__ import annotations

import ipaddress

# IP protocol numbers (IANA).
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
PROTO_P2P_CONTROL = 0xFF  # firezone-notes §3.5: reserved number, never leaves the tunnel

# IPv6 extension headers walked to find the upper layer (RFC 8200 §4).
_V6_HOP_BY_HOP = 0
_V6_ROUTING = 43
_V6_FRAGMENT = 44
_V6_DEST_OPTS = 60
_V6_EXT = frozenset((_V6_HOP_BY_HOP, _V6_ROUTING, _V6_DEST_OPTS))

# ICMP (RFC 792) and ICMPv6 (RFC 4443) types used here.
ICMP_ECHO_REPLY = 0
ICMP_DEST_UNREACHABLE = 3
ICMP_ECHO_REQUEST = 8
ICMP_TIME_EXCEEDED = 11
ICMP_CODE_HOST_UNREACHABLE = 1
ICMP_CODE_ADMIN_PROHIBITED = 13  # RFC 1812 §5.2.7.1
ICMP_ERROR_TYPES = frozenset((3, 4, 5, 11, 12))
ICMPV6_DEST_UNREACHABLE = 1
ICMPV6_PACKET_TOO_BIG = 2
ICMPV6_TIME_EXCEEDED = 3
ICMPV6_PARAM_PROBLEM = 4
ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129
ICMPV6_CODE_ADMIN_PROHIBITED = 1  # RFC 4443 §3.1
ICMPV6_CODE_ADDRESS_UNREACHABLE = 3  # RFC 4443 §3.1
ICMPV6_ERROR_TYPES = frozenset((1, 2, 3, 4))

# How much of the offending packet an ICMP error may quote.
ICMP4_ERROR_MAX = 576  # RFC 1812 §4.3.2.3: the whole error fits in 576 bytes
ICMP6_ERROR_MAX = 1280  # RFC 4443 §2.4 (c): the whole error fits in the IPv6 minimum MTU
DEFAULT_TTL = 64

# TCP flags (RFC 9293 §3.1).
TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10

# Peer-to-peer control events (firezone-notes §3.5).
P2P_ASSIGNED_IPS = 0
P2P_DOMAIN_STATUS = 1
P2P_GOODBYE = 2
P2P_HEADER_LEN = 8
_V6_UNSPECIFIED = bytes(16)

_ADDR_LEN = {4: 4, 6: 16}


# --- checksums ---------------------------------------------------------------------------------------
def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """One's-complement sum of ``data`` as 16-bit big-endian words (odd length padded with a zero)."""
    n = int.from_bytes(data, "big")
    if len(data) & 1:
        n <<= 8
    s = n % 0xFFFF
    if s == 0 and n:
        return 0xFFFF
    return s


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """Internet checksum (RFC 1071) of ``data``, optionally continuing from a partial ``ones_sum``."""
    a = ones_sum(data)
    s = (a + initial) % 0xFFFF
    if s == 0 and (a or initial):
        s = 0xFFFF
    return ~s & 0xFFFF


def pseudo_header_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """One's-complement sum of the TCP/UDP/ICMPv6 pseudo-header (RFC 9293 §3.1, RFC 8200 §8.1)."""
    return (ones_sum(src) + ones_sum(dst) + proto + length) % 0xFFFF or 0xFFFF


def _adjust(csum: int, old: bytes | bytearray, new: bytes | bytearray) -> int:
    """RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'), for ``old`` replaced by ``new`` (even lengths)."""
    x = ((~csum & 0xFFFF) + 0xFFFF - ones_sum(old) % 0xFFFF + ones_sum(new)) % 0xFFFF
    return ~(x or 0xFFFF) & 0xFFFF


def addr_bytes(addr: str | bytes | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """An address as 4 or 16 packed bytes."""
    if isinstance(addr, bytes):
        if len(addr) not in (4, 16):
            raise ValueError(f"address must be 4 or 16 bytes, got {len(addr)}")
        return addr
    if isinstance(addr, str):
        addr = ipaddress.ip_address(addr)
    return addr.packed


def parse_hostport(text: str, default_port: int = 53) -> tuple[str, int]:
    """``"192.0.2.1:53"`` / ``"[2001:db8::1]:53"`` / a bare address (``default_port``) as
    (normalized address, port); ``ValueError`` for anything else."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"not an address with an optional port: {text!r}")
        port = int(rest[1:]) if rest else default_port
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        port = int(p)
    else:
        host, port = text, default_port
    ip = ipaddress.ip_address(host)
    if not 0 < port < 65536:
        raise ValueError(f"port out of range: {port}")
    return str(ip), port


def addr_str(addr: bytes) -> str:
    """Text form of a packed 4- or 16-byte address."""
    return str(ipaddress.ip_address(bytes(addr)))


# --- parsing -----------------------------------------------------------------------------------------
class Packet:
    """A parsed IP packet over a mutable buffer; fields are read on demand.

    ``l4`` is the offset of the upper-layer header or -1 when there is none to read (non-first
    fragment, or too short for its header). ``proto`` is the upper-layer protocol number after
    IPv6 extension headers.
    """

    __slots__ = ("buf", "end", "l4", "proto", "version")

    def __init__(self, buf: bytearray, version: int, proto: int, l4: int, end: int) -> None:
        self.buf = buf
        self.version = version
        self.proto = proto
        self.l4 = l4
        self.end = end

    # addresses
    @property
    def src(self) -> bytes:
        if self.version == 4:
            return bytes(self.buf[12:16])
        return bytes(self.buf[8:24])

    @property
    def dst(self) -> bytes:
        if self.version == 4:
            return bytes(self.buf[16:20])
        return bytes(self.buf[24:40])

    @property
    def src_ip(self) -> str:
        return addr_str(self.src)

    @property
    def dst_ip(self) -> str:
        return addr_str(self.dst)

    @property
    def ttl(self) -> int:
        return self.buf[8] if self.version == 4 else self.buf[7]

    @property
    def has_ports(self) -> bool:
        return self.l4 >= 0 and self.proto in (PROTO_TCP, PROTO_UDP)

    @property
    def is_icmp(self) -> bool:
        return self.proto == (PROTO_ICMP if self.version == 4 else PROTO_ICMPV6)

    # TCP / UDP
    @property
    def sport(self) -> int:
        o = self.l4
        return (self.buf[o] << 8) | self.buf[o + 1]

    @property
    def dport(self) -> int:
        o = self.l4
        return (self.buf[o + 2] << 8) | self.buf[o + 3]

    @property
    def tcp_flags(self) -> int:
        return self.buf[self.l4 + 13] if self.proto == PROTO_TCP and self._has(14) else 0

    @property
    def payload(self) -> bytes:
        """The upper-layer payload (after the TCP/UDP/ICMP header), or b"" when unknown."""
        o = self.l4
        if o < 0:
            return b""
        if self.proto == PROTO_TCP:
            if not self._has(20):
                return b""
            return bytes(self.buf[o + ((self.buf[o + 12] >> 4) * 4) : self.end])
        if self.proto in (PROTO_UDP, PROTO_ICMP, PROTO_ICMPV6):
            return bytes(self.buf[o + 8 : self.end])
        return bytes(self.buf[o : self.end])

    @property
    def l4_bytes(self) -> bytes:
        return bytes(self.buf[self.l4 : self.end]) if self.l4 >= 0 else b""

    # ICMP / ICMPv6
    def _has(self, n: int) -> bool:
        """Whether ``n`` bytes of upper-layer header are present (a quoted packet may be cut short)."""
        return self.l4 >= 0 and self.l4 + n <= self.end

    @property
    def icmp_type(self) -> int:
        return self.buf[self.l4]

    @property
    def icmp_code(self) -> int:
        return self.buf[self.l4 + 1]

    @property
    def icmp_id(self) -> int:
        """Identifier of an echo request/reply (the 'port' of an ICMP flow); 0 when cut short."""
        if not self._has(6):
            return 0
        o = self.l4 + 4
        return (self.buf[o] << 8) | self.buf[o + 1]

    @property
    def is_icmp_echo(self) -> bool:
        if not self._has(8) or not self.is_icmp:
            return False
        t = self.buf[self.l4]
        if self.version == 4:
            return t in (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY)
        return t in (ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY)

    @property
    def is_icmp_error(self) -> bool:
        if not self._has(8) or not self.is_icmp:
            return False
        return self.buf[self.l4] in (ICMP_ERROR_TYPES if self.version == 4 else ICMPV6_ERROR_TYPES)

    def icmp_quoted(self) -> Packet | None:
        """The packet quoted by an ICMP error (possibly truncated), parsed leniently, or None."""
        if not self.is_icmp_error:
            return None
        return parse(self.buf[self.l4 + 8 : self.end], quoted=True)

    def tobytes(self) -> bytes:
        return bytes(self.buf[: self.end])

    # in-place rewrites -----------------------------------------------------------------------------
    def _l4_csum_offset(self) -> int:
        """Offset of the upper-layer checksum covering the pseudo-header, or -1."""
        o = self.l4
        if o < 0:
            return -1
        p = self.proto
        if p == PROTO_TCP:
            o += 16
        elif p == PROTO_UDP:
            o += 6
            if o + 2 > self.end:
                return -1
            if self.version == 4 and self.buf[o] == 0 and self.buf[o + 1] == 0:
                return -1  # RFC 768: zero means "no checksum"
        elif p == PROTO_ICMPV6:
            o += 2
        else:
            return -1
        return o if o + 2 <= self.end else -1

    def _patch(self, csum_off: int, old: bytes, new: bytes) -> None:
        b = self.buf
        c = _adjust((b[csum_off] << 8) | b[csum_off + 1], old, new)
        if c == 0 and self.proto == PROTO_UDP and csum_off == self.l4 + 6:
            c = 0xFFFF  # RFC 768: a computed zero is sent as all ones
        b[csum_off] = c >> 8
        b[csum_off + 1] = c & 0xFF

    def _set_addr(self, off: int, new: bytes) -> None:
        n = len(new)
        old = bytes(self.buf[off : off + n])
        if old == new:
            return
        if n != (4 if self.version == 4 else 16):
            raise ValueError("address family does not match the packet")
        self.buf[off : off + n] = new
        if self.version == 4:
            self._patch(10, old, new)
        c = self._l4_csum_offset()
        if c >= 0:
            self._patch(c, old, new)

    def set_src(self, addr: bytes) -> None:
        """Rewrite the source address, updating the IPv4 header and upper-layer checksums."""
        self._set_addr(12 if self.version == 4 else 8, addr)

    def set_dst(self, addr: bytes) -> None:
        """Rewrite the destination address, updating the IPv4 header and upper-layer checksums."""
        self._set_addr(16 if self.version == 4 else 24, addr)

    def _set_u16(self, off: int, value: int, *, csum: int) -> None:
        b = self.buf
        old = bytes(b[off : off + 2])
        new = value.to_bytes(2, "big")
        if old == new:
            return
        b[off : off + 2] = new
        if csum >= 0:
            self._patch(csum, old, new)

    def set_sport(self, port: int) -> None:
        self._set_u16(self.l4, port, csum=self._l4_csum_offset())

    def set_dport(self, port: int) -> None:
        self._set_u16(self.l4 + 2, port, csum=self._l4_csum_offset())

    def set_icmp_id(self, ident: int) -> None:
        """Rewrite an echo identifier (ICMP checksums cover the message, so patch it too)."""
        o = self.l4 + 2
        self._set_u16(self.l4 + 4, ident, csum=o if o + 2 <= self.end else -1)

    def recompute_checksums(self) -> None:
        """Recompute the IPv4 header and upper-layer checksums from scratch."""
        b = self.buf
        if self.version == 4:
            ihl = (b[0] & 0x0F) * 4
            b[10:12] = b"\x00\x00"
            b[10:12] = checksum(b[:ihl]).to_bytes(2, "big")
        o = self.l4
        if o < 0:
            return
        p = self.proto
        if p == PROTO_ICMP:
            if o + 4 <= self.end:
                b[o + 2 : o + 4] = b"\x00\x00"
                b[o + 2 : o + 4] = checksum(b[o : self.end]).to_bytes(2, "big")
            return
        c = {PROTO_TCP: 16, PROTO_UDP: 6, PROTO_ICMPV6: 2}.get(p)
        if c is None or o + c + 2 > self.end:
            return
        b[o + c : o + c + 2] = b"\x00\x00"
        ph = pseudo_header_sum(self.src, self.dst, p, self.end - o)
        v = checksum(b[o : self.end], ph)
        if v == 0 and p == PROTO_UDP:
            v = 0xFFFF
        b[o + c : o + c + 2] = v.to_bytes(2, "big")

    def checksums_ok(self) -> bool:
        """True when the IPv4 header and the upper-layer checksum (where there is one) verify."""
        b = self.buf
        if self.version == 4 and ones_sum(b[: (b[0] & 0x0F) * 4]) != 0xFFFF:
            return False
        o = self.l4
        if o < 0:
            return True
        p = self.proto
        if not self._has(_l4_min(p)):
            return False
        if p == PROTO_ICMP:
            return ones_sum(b[o : self.end]) == 0xFFFF
        if p == PROTO_UDP and self.version == 4 and b[o + 6] == 0 and b[o + 7] == 0:
            return True
        if p not in (PROTO_TCP, PROTO_UDP, PROTO_ICMPV6):
            return True
        ph = pseudo_header_sum(self.src, self.dst, p, self.end - o)
        return (ones_sum(b[o : self.end]) + ph) % 0xFFFF == 0

    def __repr__(self) -> str:
        if self.has_ports:
            return f"<Packet v{self.version} proto={self.proto} {self.src_ip}:{self.sport} -> {self.dst_ip}:{self.dport}>"
        return f"<Packet v{self.version} proto={self.proto} {self.src_ip} -> {self.dst_ip}>"


def _l4_min(proto: int) -> int:
    if proto == PROTO_TCP:
        return 20
    if proto in (PROTO_UDP, PROTO_ICMP, PROTO_ICMPV6):
        return 8
    return 0


def parse(data: bytes | bytearray | memoryview, *, quoted: bool = False) -> Packet | None:
    """Parse an IP packet; None when it is not well formed. Copies ``data`` unless it is a bytearray.

    ``quoted=True`` accepts a truncated packet (the copy inside an ICMP error): lengths are
    clamped to what is present and the upper-layer header may be partial (ports need 4 bytes).
    """
    buf = data if isinstance(data, bytearray) else bytearray(data)
    n = len(buf)
    if n < 20:
        return None
    v = buf[0] >> 4
    if v == 4:
        ihl = (buf[0] & 0x0F) * 4
        total = (buf[2] << 8) | buf[3]
        if ihl < 20 or n < ihl:
            return None
        if total > n:
            if not quoted:
                return None
            total = n
        if total < ihl:
            return None
        proto = buf[9]
        frag_off = ((buf[6] & 0x1F) << 8) | buf[7]
        l4 = ihl if frag_off == 0 else -1
        end = total
    elif v == 6:
        if n < 40:
            return None
        end = 40 + ((buf[4] << 8) | buf[5])
        if end > n:
            if not quoted:
                return None
            end = n
        proto = buf[6]
        off = 40
        l4 = 40
        while proto in _V6_EXT or proto == _V6_FRAGMENT:
            if off + 8 > end:
                return None
            nxt = buf[off]
            if proto == _V6_FRAGMENT:
                if ((buf[off + 2] << 8) | buf[off + 3]) & 0xFFF8:
                    off = -1  # not the first fragment: no upper-layer header here
                    proto = nxt
                    break
                off += 8
            else:
                off += (buf[off + 1] + 1) * 8
            proto = nxt
        l4 = off
    else:
        return None
    if l4 >= 0:
        need = 4 if quoted else _l4_min(proto)
        if proto == PROTO_TCP and not quoted and l4 + 13 < end:
            need = max(20, (buf[l4 + 12] >> 4) * 4)
        if l4 + need > end:
            if not quoted:
                return None
            l4 = -1
    return Packet(buf, v, proto, l4, end)


def version_of(data: bytes | bytearray) -> int:
    return data[0] >> 4 if data else 0


# --- building ----------------------------------------------------------------------------------------
def build_ip(
    src: bytes | str,
    dst: bytes | str,
    proto: int,
    payload: bytes,
    *,
    ttl: int = DEFAULT_TTL,
    ident: int = 0,
    tos: int = 0,
) -> bytes:
    """An IPv4 or IPv6 packet (family from the address length) around ``payload``; no checksums below IP."""
    s, d = addr_bytes(src), addr_bytes(dst)
    if len(s) != len(d):
        raise ValueError("source and destination are of different families")
    if len(s) == 4:
        total = 20 + len(payload)
        if total > 0xFFFF:
            raise ValueError("packet too large")
        h = bytearray(
            bytes((0x45, tos))
            + total.to_bytes(2, "big")
            + ident.to_bytes(2, "big")
            + b"\x40\x00"
            + bytes((ttl, proto))
            + b"\x00\x00"
            + s
            + d
        )
        h[10:12] = checksum(h).to_bytes(2, "big")
        return bytes(h) + payload
    if len(payload) > 0xFFFF:
        raise ValueError("packet too large")
    return (
        bytes((0x60 | (tos >> 4), (tos & 0x0F) << 4, 0, 0))
        + len(payload).to_bytes(2, "big")
        + bytes((proto, ttl))
        + s
        + d
        + payload
    )


def _with_l4_checksum(packet: bytes) -> bytes:
    p = parse(packet)
    assert p is not None
    p.recompute_checksums()
    return bytes(p.buf)


def build_udp(
    src: bytes | str,
    dst: bytes | str,
    sport: int,
    dport: int,
    payload: bytes = b"",
    *,
    ttl: int = DEFAULT_TTL,
) -> bytes:
    """A UDP datagram in IPv4 or IPv6 with correct checksums."""
    udp = (
        sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + (8 + len(payload)).to_bytes(2, "big")
    )
    return _with_l4_checksum(build_ip(src, dst, PROTO_UDP, udp + b"\x00\x00" + payload, ttl=ttl))


def build_tcp(
    src: bytes | str,
    dst: bytes | str,
    sport: int,
    dport: int,
    payload: bytes = b"",
    *,
    flags: int = TCP_ACK,
    seq: int = 0,
    ack: int = 0,
    window: int = 65535,
    ttl: int = DEFAULT_TTL,
) -> bytes:
    """A TCP segment (no options) in IPv4 or IPv6 with correct checksums."""
    tcp = (
        sport.to_bytes(2, "big")
        + dport.to_bytes(2, "big")
        + (seq & 0xFFFFFFFF).to_bytes(4, "big")
        + (ack & 0xFFFFFFFF).to_bytes(4, "big")
        + bytes((5 << 4, flags))
        + window.to_bytes(2, "big")
        + b"\x00\x00\x00\x00"
    )
    return _with_l4_checksum(build_ip(src, dst, PROTO_TCP, tcp + payload, ttl=ttl))


def build_icmp(
    src: bytes | str,
    dst: bytes | str,
    icmp_type: int,
    code: int,
    rest: bytes = bytes(4),
    payload: bytes = b"",
    *,
    ttl: int = DEFAULT_TTL,
) -> bytes:
    """An ICMP (IPv4) or ICMPv6 (IPv6) message: type, code, checksum, 4 bytes ``rest``, payload."""
    v6 = len(addr_bytes(src)) == 16
    body = bytes((icmp_type, code)) + b"\x00\x00" + rest + payload
    return _with_l4_checksum(build_ip(src, dst, PROTO_ICMPV6 if v6 else PROTO_ICMP, body, ttl=ttl))


def build_echo(
    src: bytes | str,
    dst: bytes | str,
    ident: int,
    seq: int,
    payload: bytes = b"",
    *,
    reply: bool = False,
    ttl: int = DEFAULT_TTL,
) -> bytes:
    """An ICMP/ICMPv6 echo request (or reply)."""
    v6 = len(addr_bytes(src)) == 16
    if v6:
        t = ICMPV6_ECHO_REPLY if reply else ICMPV6_ECHO_REQUEST
    else:
        t = ICMP_ECHO_REPLY if reply else ICMP_ECHO_REQUEST
    return build_icmp(
        src, dst, t, 0, ident.to_bytes(2, "big") + seq.to_bytes(2, "big"), payload, ttl=ttl
    )


def _may_answer_with_error(p: Packet) -> bool:
    """RFC 1122 §3.2.2 / RFC 4443 §2.4 (e): no ICMP error about an ICMP error, a non-first fragment,
    or a packet from an unspecified, multicast or broadcast source."""
    if p.is_icmp_error:
        return False
    if p.l4 < 0:
        return False
    src = p.src
    if p.version == 4:
        return not (src[0] == 0 or src[0] >= 224)
    return src != _V6_UNSPECIFIED and src[0] != 0xFF


def icmp_unreachable(packet: bytes | bytearray | Packet, code4: int, code6: int) -> bytes | None:
    """A destination-unreachable error for the sender of ``packet``, as if its destination sent it."""
    p = packet if isinstance(packet, Packet) else parse(packet)
    if p is None or not _may_answer_with_error(p):
        return None
    original = bytes(p.buf[: p.end])
    if p.version == 4:
        quote = original[: ICMP4_ERROR_MAX - 28]
        return build_icmp(p.dst, p.src, ICMP_DEST_UNREACHABLE, code4, bytes(4), quote)
    quote = original[: ICMP6_ERROR_MAX - 48]
    return build_icmp(p.dst, p.src, ICMPV6_DEST_UNREACHABLE, code6, bytes(4), quote)


def icmp_prohibited(packet: bytes | bytearray | Packet) -> bytes | None:
    """'Communication administratively prohibited' (ICMP 3/13, ICMPv6 1/1) for ``packet``."""
    return icmp_unreachable(packet, ICMP_CODE_ADMIN_PROHIBITED, ICMPV6_CODE_ADMIN_PROHIBITED)


def icmp_host_unreachable(packet: bytes | bytearray | Packet) -> bytes | None:
    """'Host unreachable' (ICMP 3/1, ICMPv6 1/3 address unreachable) for ``packet``."""
    return icmp_unreachable(packet, ICMP_CODE_HOST_UNREACHABLE, ICMPV6_CODE_ADDRESS_UNREACHABLE)


def prohibited_quoted_dst(packet: bytes | bytearray) -> tuple[int, int] | None:
    """For an 'administratively prohibited' error: (IP version, quoted destination as int); else None."""
    if len(packet) < 28:
        return None
    v = packet[0] >> 4
    if v == 4:
        if packet[9] != PROTO_ICMP:
            return None
        o = (packet[0] & 0x0F) * 4
        if (
            len(packet) < o + 8
            or packet[o] != ICMP_DEST_UNREACHABLE
            or packet[o + 1] != ICMP_CODE_ADMIN_PROHIBITED
        ):
            return None
    elif v == 6:
        o = 40
        if len(packet) < o + 8 or packet[6] != PROTO_ICMPV6:
            return None
        if packet[o] != ICMPV6_DEST_UNREACHABLE or packet[o + 1] != ICMPV6_CODE_ADMIN_PROHIBITED:
            return None
    else:
        return None
    q = o + 8
    if len(packet) >= q + 20 and packet[q] >> 4 == 4:
        return 4, int.from_bytes(packet[q + 16 : q + 20], "big")
    if len(packet) >= q + 40 and packet[q] >> 4 == 6:
        return 6, int.from_bytes(packet[q + 24 : q + 40], "big")
    return None


# --- peer-to-peer control packets --------------------------------------------------------------------
def build_p2p_control(event: int, body: bytes) -> bytes:
    """A control packet: IPv6, src = dst = ``::``, next header 0xFF, 8-byte header (event type), body."""
    if not 0 <= event <= 0xFF:
        raise ValueError("event type must fit in one byte")
    return build_ip(
        _V6_UNSPECIFIED,
        _V6_UNSPECIFIED,
        PROTO_P2P_CONTROL,
        bytes((event,)) + bytes(P2P_HEADER_LEN - 1) + body,
        ttl=0,
    )


def is_p2p_control(packet: bytes | bytearray) -> bool:
    return (
        len(packet) >= 40 + P2P_HEADER_LEN
        and packet[0] >> 4 == 6
        and packet[6] == PROTO_P2P_CONTROL
        and packet[8:40] == bytes(32)
    )


def parse_p2p_control(packet: bytes | bytearray) -> tuple[int, bytes] | None:
    """(event type, body) of a control packet; None for any other packet."""
    if not is_p2p_control(packet):
        return None
    end = 40 + ((packet[4] << 8) | packet[5])
    if end > len(packet) or end < 40 + P2P_HEADER_LEN:
        return None
    return packet[40], bytes(packet[40 + P2P_HEADER_LEN : end])
