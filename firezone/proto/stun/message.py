"""STUN message codec (RFC 8489) and TURN ChannelData framing (RFC 8656 §12).

Wire format (RFC 8489 §5)::

    0                   1                   2                   3
    |0 0|     STUN Message Type     |         Message Length        |
    |                      Magic Cookie = 0x2112A442                |
    |                 Transaction ID (96 bits)                      |
    | attributes: Type(16) Length(16) Value (padded to 4 bytes) ... |

``parse_message`` checks the header, every attribute's bounds and value, and FINGERPRINT; it keeps
the raw bytes and where MESSAGE-INTEGRITY(-SHA256) sat so that :func:`verify_integrity` can be run
later, once the caller knows which key applies (the key depends on USERNAME/REALM in the message).
Attributes after MESSAGE-INTEGRITY other than MESSAGE-INTEGRITY-SHA256 and FINGERPRINT are ignored
(RFC 8489 §14.5).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from firezone.proto.stun.attributes import (
    ATTRIBUTES,
    MAGIC_BYTES,
    MAGIC_COOKIE,
    REASONS,
    Attr,
    ErrorCode,
    is_comprehension_required,
)
from firezone.proto.stun.errors import (
    AttributeParseError,
    ChannelDataError,
    FingerprintError,
    MessageLengthError,
    NotStunError,
)

HEADER_LEN = 20
FINGERPRINT_XOR = 0x5354554E  # RFC 8489 §14.7: "STUN"
CHANNEL_MIN, CHANNEL_MAX = 0x4000, 0x4FFF  # RFC 8656 §12: valid channel numbers

_HDR = struct.Struct("!HHI12s")
_ATTR_HDR = struct.Struct("!HH")
_MI_TYPES = (Attr.MESSAGE_INTEGRITY, Attr.MESSAGE_INTEGRITY_SHA256, Attr.FINGERPRINT)


class Method(IntEnum):
    """STUN/TURN methods (RFC 8489 §18.2, RFC 8656 §17)."""

    BINDING = 0x001
    ALLOCATE = 0x003
    REFRESH = 0x004
    SEND = 0x006
    DATA = 0x007
    CREATE_PERMISSION = 0x008
    CHANNEL_BIND = 0x009


class Class(IntEnum):
    """Message classes (RFC 8489 §5): the C1 C0 bits."""

    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


def _message_type(method: int, cls: int) -> int:
    # RFC 8489 §5: M11..M7 C1 M6..M4 C0 M3..M0
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((cls & 0b01) << 4)
        | ((cls & 0b10) << 7)
    )


def _split_type(t: int) -> tuple[int, int]:
    method = (t & 0x000F) | ((t & 0x00E0) >> 1) | ((t & 0x3E00) >> 2)
    cls = ((t >> 4) & 0b01) | ((t >> 7) & 0b10)
    return method, cls


@dataclass(slots=True, eq=False)
class Message:
    """A STUN message: method, class, 12-byte transaction id and ordered attributes.

    ``attributes`` is a list of ``(type, value)``; decoded values follow
    :mod:`firezone.proto.stun.attributes`, unknown types keep their raw bytes. A parsed message
    also remembers its raw bytes for :func:`verify_integrity`.
    """

    method: int
    cls: Class
    transaction_id: bytes
    attributes: list[tuple[int, Any]] = field(default_factory=list)
    raw: bytes | None = field(default=None, repr=False)
    # offsets of MESSAGE-INTEGRITY / -SHA256 attribute headers inside ``raw`` (-1 when absent)
    _mi_at: int = field(default=-1, repr=False)
    _mi256_at: int = field(default=-1, repr=False)

    def __post_init__(self) -> None:
        if len(self.transaction_id) != 12:
            raise ValueError("transaction_id must be 12 bytes")
        if not 0 <= int(self.method) <= 0xFFF:
            raise ValueError("method must fit in 12 bits")
        self.cls = Class(self.cls)

    # -- access -----------------------------------------------------------------------------

    def get(self, attr_type: int, default: Any = None) -> Any:
        """Return the first value of ``attr_type``, or ``default``."""
        for t, v in self.attributes:
            if t == attr_type:
                return v
        return default

    def get_all(self, attr_type: int) -> list[Any]:
        """Return every value of ``attr_type`` in order (e.g. several XOR-PEER-ADDRESS)."""
        return [v for t, v in self.attributes if t == attr_type]

    def __contains__(self, attr_type: object) -> bool:
        return any(t == attr_type for t, _ in self.attributes)

    def add(self, attr_type: int, value: Any = True) -> Message:
        """Append an attribute; returns ``self`` so calls chain."""
        self.attributes.append((int(attr_type), value))
        return self

    def unknown_comprehension_required(self) -> list[int]:
        """Types in 0x0000-0x7FFF this codec does not understand (answer them with 420)."""
        return [
            t for t, _ in self.attributes if t not in ATTRIBUTES and is_comprehension_required(t)
        ]

    @property
    def has_integrity(self) -> bool:
        """True when the parsed message carried MESSAGE-INTEGRITY or -SHA256."""
        return self._mi_at >= 0 or self._mi256_at >= 0

    @property
    def integrity_sha256(self) -> bool:
        """True when the parsed message carried MESSAGE-INTEGRITY-SHA256."""
        return self._mi256_at >= 0

    # -- encoding -----------------------------------------------------------------------------

    def encode(
        self, *, key: bytes | None = None, sha256: bool = False, fingerprint: bool = True
    ) -> bytes:
        """Serialize; with ``key``, add MESSAGE-INTEGRITY (or -SHA256); then FINGERPRINT."""
        tid = self.transaction_id
        parts: list[bytes] = []
        for t, v in self.attributes:
            if t in _MI_TYPES:
                continue
            spec = ATTRIBUTES.get(t)
            value = spec.encode(v, tid) if spec is not None else bytes(v)
            n = len(value)
            if n > 0xFFFF:
                raise ValueError(f"attribute 0x{t:04x} too long")
            parts.append(_ATTR_HDR.pack(t, n))
            parts.append(value)
            if n & 3:
                parts.append(b"\x00" * (4 - (n & 3)))
        body = b"".join(parts)
        mtype = _message_type(int(self.method), int(self.cls))
        if key is not None:
            # RFC 8489 §14.5/§14.6: the HMAC covers the header (with the length already counting
            # the integrity attribute) and everything before the attribute.
            mac_len = 32 if sha256 else 20
            length = len(body) + 4 + mac_len
            head = _HDR.pack(mtype, length, MAGIC_COOKIE, tid)
            if sha256:
                mac = hmac.new(key, head + body, hashlib.sha256).digest()
                body += _ATTR_HDR.pack(Attr.MESSAGE_INTEGRITY_SHA256, 32) + mac
            else:
                mac = hmac.new(key, head + body, hashlib.sha1).digest()
                body += _ATTR_HDR.pack(Attr.MESSAGE_INTEGRITY, 20) + mac
        if fingerprint:
            head = _HDR.pack(mtype, len(body) + 8, MAGIC_COOKIE, tid)
            crc = (zlib.crc32(head + body) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
            return head + body + _ATTR_HDR.pack(Attr.FINGERPRINT, 4) + crc.to_bytes(4, "big")
        return _HDR.pack(mtype, len(body), MAGIC_COOKIE, tid) + body


# -- parsing ----------------------------------------------------------------------------------


def is_stun(data: bytes | bytearray | memoryview) -> bool:
    """True for a datagram that looks like STUN: first two bits 00 and the magic cookie."""
    return len(data) >= HEADER_LEN and data[0] < 0x40 and data[4:8] == MAGIC_BYTES


def parse_message(data: bytes | bytearray | memoryview) -> Message:
    """Parse one STUN message; raise a :class:`ParseError` subclass with an exact message."""
    data = bytes(data)
    n = len(data)
    if n < HEADER_LEN:
        raise NotStunError("STUN message shorter than the 20-byte header")
    if data[0] & 0xC0:
        raise NotStunError("first two bits of a STUN message must be zero")
    mtype, length, cookie, tid = _HDR.unpack_from(data)
    if cookie != MAGIC_COOKIE:
        raise NotStunError("magic cookie mismatch")
    if length & 3:
        raise MessageLengthError("STUN message length is not a multiple of 4")
    if length != n - HEADER_LEN:
        raise MessageLengthError(
            f"STUN message length {length} does not match the {n - HEADER_LEN} bytes after the header"
        )
    method, cls = _split_type(mtype)
    try:
        method = Method(method)
    except ValueError:
        pass
    attrs: list[tuple[int, Any]] = []
    mi_at = mi256_at = -1
    pos = HEADER_LEN
    while pos < n:
        if pos + 4 > n:
            raise AttributeParseError("attribute header truncated")
        t, alen = _ATTR_HDR.unpack_from(data, pos)
        vstart = pos + 4
        vend = vstart + alen
        if vend > n:
            raise AttributeParseError(f"attribute 0x{t:04x} value truncated", t)
        if t == Attr.FINGERPRINT:
            if vend + ((4 - alen) & 3) != n:
                raise FingerprintError("FINGERPRINT is not the last attribute")
            if alen != 4:
                raise FingerprintError("FINGERPRINT value must be 4 bytes")
            want = (zlib.crc32(data[:pos]) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
            got = int.from_bytes(data[vstart:vend], "big")
            if want != got:
                raise FingerprintError("FINGERPRINT mismatch")
            attrs.append((t, got))
        elif mi_at >= 0 and t != Attr.MESSAGE_INTEGRITY_SHA256:
            pass  # RFC 8489 §14.5: ignored after MESSAGE-INTEGRITY
        elif mi256_at >= 0:
            pass  # RFC 8489 §14.6: only FINGERPRINT counts after MESSAGE-INTEGRITY-SHA256
        else:
            value = data[vstart:vend]
            spec = ATTRIBUTES.get(t)
            if spec is not None:
                attrs.append((t, spec.decode(value, tid)))
            else:
                attrs.append((t, value))
            if t == Attr.MESSAGE_INTEGRITY:
                mi_at = pos
            elif t == Attr.MESSAGE_INTEGRITY_SHA256:
                mi256_at = pos
        pos = vend + ((4 - alen) & 3)
    if pos != n:  # padding of the last attribute ran past the end
        raise AttributeParseError("attribute padding truncated")
    return Message(method, Class(cls), tid, attrs, data, mi_at, mi256_at)


def verify_integrity(msg: Message, key: bytes) -> bool:
    """Check MESSAGE-INTEGRITY-SHA256 if present, else MESSAGE-INTEGRITY, with ``key``."""
    raw = msg.raw
    if raw is None:
        return False
    if msg._mi256_at >= 0:
        at, algo = msg._mi256_at, hashlib.sha256
    elif msg._mi_at >= 0:
        at, algo = msg._mi_at, hashlib.sha1
    else:
        return False
    mac_len = (raw[at + 2] << 8) | raw[at + 3]
    # The length field is rewritten to end right after the integrity attribute.
    head = raw[:2] + (at - HEADER_LEN + 4 + mac_len).to_bytes(2, "big") + raw[4:at]
    want = hmac.new(key, head, algo).digest()[:mac_len]
    return hmac.compare_digest(want, raw[at + 4 : at + 4 + mac_len])


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """RFC 8489 §9.2.2: key = MD5(username ":" realm ":" password) (inputs already prepared)."""
    return hashlib.md5(f"{username}:{realm}:{password}".encode(), usedforsecurity=False).digest()


# -- convenience builders -----------------------------------------------------------------------


def success_response(request: Message, attributes: Iterable[tuple[int, Any]] = ()) -> Message:
    """A success response to ``request`` with the same method and transaction id."""
    return Message(request.method, Class.SUCCESS, request.transaction_id, list(attributes))


def error_response(
    request: Message,
    code: int,
    reason: str | None = None,
    attributes: Iterable[tuple[int, Any]] = (),
) -> Message:
    """An error response carrying ERROR-CODE ``code`` (standard reason phrase by default)."""
    ec = ErrorCode(code, reason if reason is not None else REASONS.get(code, ""))
    return Message(
        request.method, Class.ERROR, request.transaction_id, [(Attr.ERROR_CODE, ec), *attributes]
    )


# -- ChannelData (RFC 8656 §12.4) ---------------------------------------------------------------

_CD_HDR = struct.Struct("!HH")


def is_channel_data(data: bytes | bytearray | memoryview) -> bool:
    """True when the first byte puts the datagram in the ChannelData range 0x40-0x7F."""
    return len(data) >= 4 and 0x40 <= data[0] <= 0x7F


def encode_channel_data(channel: int, payload: bytes | bytearray | memoryview) -> bytes:
    """Frame ``payload`` as ChannelData; no padding (RFC 8656 §12.5: not needed over UDP)."""
    return _CD_HDR.pack(channel, len(payload)) + bytes(payload)


def parse_channel_data(data: bytes | bytearray | memoryview) -> tuple[int, memoryview]:
    """Return ``(channel, payload)``; the datagram may carry at most the 0-3 padding bytes."""
    n = len(data)
    if n < 4:
        raise ChannelDataError("ChannelData shorter than its 4-byte header")
    channel = (data[0] << 8) | data[1]
    if not 0x4000 <= channel <= 0x7FFF:
        raise ChannelDataError(f"channel number 0x{channel:04x} outside 0x4000-0x7FFF")
    length = (data[2] << 8) | data[3]
    if n - 4 < length:
        raise ChannelDataError(f"ChannelData length {length} exceeds the {n - 4} bytes present")
    if n - 4 > ((length + 3) & ~3):
        raise ChannelDataError(
            f"ChannelData carries {n - 4 - length} bytes beyond its length and padding"
        )
    return channel, memoryview(data)[4 : 4 + length]
