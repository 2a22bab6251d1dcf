"""STUN/TURN/ICE attribute table: type -> name, decoder, encoder.

Python values per attribute kind:

* addresses (MAPPED-ADDRESS, XOR-*-ADDRESS): ``(ip_text, port)``; the IP text is the canonical
  ``str(ipaddress.ip_address(...))`` form, IPv6 compressed and lowercase.
* text (USERNAME, REALM, NONCE, SOFTWARE): ``str``.
* ERROR-CODE: :class:`ErrorCode`; ADDRESS-ERROR-CODE: :class:`AddressErrorCode`.
* 32/64-bit numbers (LIFETIME, PRIORITY, FINGERPRINT, ICE-CONTROLLED/-CONTROLLING): ``int``.
* one-byte fields padded to 4 (REQUESTED-TRANSPORT, REQUESTED-/ADDITIONAL-ADDRESS-FAMILY): ``int``.
* EVEN-PORT: ``bool`` (the R bit); RESERVATION-TOKEN: 8 ``bytes``; CHANNEL-NUMBER: ``int``; DATA, MESSAGE-INTEGRITY(-SHA256): ``bytes``; USE-CANDIDATE: ``True``;
  UNKNOWN-ATTRIBUTES: ``tuple[int, ...]``.

Attributes whose type is not in :data:`ATTRIBUTES` are kept as raw ``bytes``.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NamedTuple

from firezone.proto.stun.errors import AttributeParseError

MAGIC_COOKIE = 0x2112A442  # RFC 8489 §5
MAGIC_BYTES = MAGIC_COOKIE.to_bytes(4, "big")

# RFC 8489 §14.8 / RFC 8656 §18.4: address family octets.
FAMILY_IPV4 = 0x01
FAMILY_IPV6 = 0x02


class Attr(IntEnum):
    """Attribute types (RFC 8489 §18.3, RFC 8656 §18, RFC 8445 §16.1)."""

    MAPPED_ADDRESS = 0x0001
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    CHANNEL_NUMBER = 0x000C
    LIFETIME = 0x000D
    XOR_PEER_ADDRESS = 0x0012
    DATA = 0x0013
    REALM = 0x0014
    NONCE = 0x0015
    XOR_RELAYED_ADDRESS = 0x0016
    REQUESTED_ADDRESS_FAMILY = 0x0017
    EVEN_PORT = 0x0018
    REQUESTED_TRANSPORT = 0x0019
    DONT_FRAGMENT = 0x001A
    MESSAGE_INTEGRITY_SHA256 = 0x001C
    USERHASH = 0x001E
    XOR_MAPPED_ADDRESS = 0x0020
    RESERVATION_TOKEN = 0x0022
    PRIORITY = 0x0024
    USE_CANDIDATE = 0x0025
    ADDITIONAL_ADDRESS_FAMILY = 0x8000
    ADDRESS_ERROR_CODE = 0x8001
    SOFTWARE = 0x8022
    FINGERPRINT = 0x8028
    ICE_CONTROLLED = 0x8029
    ICE_CONTROLLING = 0x802A


def is_comprehension_required(attr_type: int) -> bool:
    """RFC 8489 §14: types 0x0000-0x7FFF must be understood by the receiver."""
    return attr_type < 0x8000


class ErrorCode(NamedTuple):
    """ERROR-CODE value: a 300-699 code and a reason phrase."""

    code: int
    reason: str = ""


class AddressErrorCode(NamedTuple):
    """ADDRESS-ERROR-CODE value (RFC 8656 §18.12): family octet, code, reason."""

    family: int
    code: int
    reason: str = ""


# Reason phrases (RFC 8489 §14.8, RFC 8656 §18.11).
REASONS = {
    300: "Try Alternate",
    400: "Bad Request",
    401: "Unauthenticated",
    403: "Forbidden",
    420: "Unknown Attribute",
    437: "Allocation Mismatch",
    438: "Stale Nonce",
    440: "Address Family not Supported",
    441: "Wrong Credentials",
    442: "Unsupported Transport Protocol",
    443: "Peer Address Family Mismatch",
    486: "Allocation Quota Reached",
    500: "Server Error",
    508: "Insufficient Capacity",
}


def _fail(attr_type: int, what: str) -> AttributeParseError:
    name = _NAMES.get(attr_type, f"0x{attr_type:04x}")
    return AttributeParseError(f"{name}: {what}", attr_type)


# -- addresses ---------------------------------------------------------------------------------


def _decode_address(attr_type: int, value: bytes, xor: bytes | None) -> tuple[str, int]:
    n = len(value)
    if n < 4:
        raise _fail(attr_type, "value too short")
    family = value[1]
    if family == FAMILY_IPV4:
        if n != 8:
            raise _fail(attr_type, "IPv4 address needs 8 bytes")
        raw = value[4:8]
    elif family == FAMILY_IPV6:
        if n != 20:
            raise _fail(attr_type, "IPv6 address needs 20 bytes")
        raw = value[4:20]
    else:
        raise _fail(attr_type, f"unknown address family {family}")
    port = (value[2] << 8) | value[3]
    if xor is not None:
        port ^= MAGIC_COOKIE >> 16
        raw = bytes(a ^ b for a, b in zip(raw, xor))
    return str(ipaddress.ip_address(raw)), port


def _encode_address(attr_type: int, value: tuple[str, int], xor: bytes | None) -> bytes:
    ip_text, port = value[0], value[1]
    packed = ipaddress.ip_address(ip_text).packed
    family = FAMILY_IPV4 if len(packed) == 4 else FAMILY_IPV6
    if xor is not None:
        port ^= MAGIC_COOKIE >> 16
        packed = bytes(a ^ b for a, b in zip(packed, xor))
    return struct.pack("!BBH", 0, family, port) + packed


def _plain_address(attr_type: int) -> tuple[Decoder, Encoder]:
    return (
        lambda v, tid: _decode_address(attr_type, v, None),
        lambda v, tid: _encode_address(attr_type, v, None),
    )


def _xor_address(attr_type: int) -> tuple[Decoder, Encoder]:
    # RFC 8489 §14.2: IPv4 XORs with the cookie, IPv6 with cookie || transaction id.
    return (
        lambda v, tid: _decode_address(attr_type, v, MAGIC_BYTES + tid),
        lambda v, tid: _encode_address(attr_type, v, MAGIC_BYTES + tid),
    )


# -- scalars and text ----------------------------------------------------------------------------


def _uint(attr_type: int, size: int) -> tuple[Decoder, Encoder]:
    def dec(v: bytes, tid: bytes) -> int:
        if len(v) != size:
            raise _fail(attr_type, f"value must be {size} bytes, got {len(v)}")
        return int.from_bytes(v, "big")

    return dec, lambda v, tid: int(v).to_bytes(size, "big")


def _octet_rffu(attr_type: int) -> tuple[Decoder, Encoder]:
    """One meaningful byte followed by three reserved ones (REQUESTED-TRANSPORT, families)."""

    def dec(v: bytes, tid: bytes) -> int:
        if len(v) != 4:
            raise _fail(attr_type, f"value must be 4 bytes, got {len(v)}")
        return v[0]

    return dec, lambda v, tid: bytes((int(v), 0, 0, 0))


def _text(attr_type: int, max_bytes: int) -> tuple[Decoder, Encoder]:
    def dec(v: bytes, tid: bytes) -> str:
        if len(v) > max_bytes:
            raise _fail(attr_type, f"longer than {max_bytes} bytes")
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            raise _fail(attr_type, "not UTF-8") from None

    return dec, lambda v, tid: v.encode("utf-8")


def _raw(attr_type: int, sizes: Callable[[int], bool] | None = None) -> tuple[Decoder, Encoder]:
    def dec(v: bytes, tid: bytes) -> bytes:
        if sizes is not None and not sizes(len(v)):
            raise _fail(attr_type, f"bad length {len(v)}")
        return bytes(v)

    return dec, lambda v, tid: bytes(v)


def _decode_error_code(v: bytes, tid: bytes) -> ErrorCode:
    if len(v) < 4:
        raise _fail(Attr.ERROR_CODE, "value too short")
    cls, number = v[2] & 0x07, v[3]
    if not 3 <= cls <= 6 or number > 99:
        raise _fail(Attr.ERROR_CODE, f"invalid code {cls}{number:02d}")
    try:
        reason = v[4:].decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(Attr.ERROR_CODE, "reason not UTF-8") from None
    return ErrorCode(cls * 100 + number, reason)


def _encode_error_code(v: ErrorCode | tuple[int, str], tid: bytes) -> bytes:
    code, reason = v[0], v[1]
    return bytes((0, 0, code // 100, code % 100)) + reason.encode("utf-8")


def _decode_address_error_code(v: bytes, tid: bytes) -> AddressErrorCode:
    if len(v) < 4:
        raise _fail(Attr.ADDRESS_ERROR_CODE, "value too short")
    cls, number = v[2] & 0x07, v[3]
    if not 3 <= cls <= 6 or number > 99:
        raise _fail(Attr.ADDRESS_ERROR_CODE, f"invalid code {cls}{number:02d}")
    try:
        reason = v[4:].decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(Attr.ADDRESS_ERROR_CODE, "reason not UTF-8") from None
    return AddressErrorCode(v[0], cls * 100 + number, reason)


def _encode_address_error_code(v: AddressErrorCode, tid: bytes) -> bytes:
    return bytes((v[0], 0, v[1] // 100, v[1] % 100)) + v[2].encode("utf-8")


def _decode_unknown(v: bytes, tid: bytes) -> tuple[int, ...]:
    if len(v) % 2:
        raise _fail(Attr.UNKNOWN_ATTRIBUTES, "odd length")
    return tuple(int.from_bytes(v[i : i + 2], "big") for i in range(0, len(v), 2))


def _encode_unknown(v: tuple[int, ...], tid: bytes) -> bytes:
    return b"".join(int(t).to_bytes(2, "big") for t in v)


def _decode_flag(v: bytes, tid: bytes) -> bool:
    if v:
        raise _fail(Attr.USE_CANDIDATE, "value must be empty")
    return True


def _decode_even_port(v: bytes, tid: bytes) -> bool:
    # RFC 8656 §18.9: one byte, the R bit first; a few clients pad it to four.
    if not 1 <= len(v) <= 4:
        raise _fail(Attr.EVEN_PORT, f"bad length {len(v)}")
    return bool(v[0] & 0x80)


def _decode_channel(v: bytes, tid: bytes) -> int:
    if len(v) != 4:
        raise _fail(Attr.CHANNEL_NUMBER, f"value must be 4 bytes, got {len(v)}")
    return (v[0] << 8) | v[1]


Decoder = Callable[[bytes, bytes], Any]
Encoder = Callable[[Any, bytes], bytes]


@dataclass(frozen=True, slots=True)
class AttrSpec:
    """One row of the attribute table."""

    name: str
    decode: Decoder
    encode: Encoder


def _row(attr: Attr, codec: tuple[Decoder, Encoder]) -> tuple[int, AttrSpec]:
    return int(attr), AttrSpec(attr.name.replace("_", "-"), codec[0], codec[1])


ATTRIBUTES: dict[int, AttrSpec] = dict(
    [
        _row(Attr.MAPPED_ADDRESS, _plain_address(Attr.MAPPED_ADDRESS)),
        _row(Attr.XOR_MAPPED_ADDRESS, _xor_address(Attr.XOR_MAPPED_ADDRESS)),
        _row(Attr.XOR_PEER_ADDRESS, _xor_address(Attr.XOR_PEER_ADDRESS)),
        _row(Attr.XOR_RELAYED_ADDRESS, _xor_address(Attr.XOR_RELAYED_ADDRESS)),
        # RFC 8489 §14.3/§14.9/§14.10/§14.14: USERNAME < 513 bytes, others < 128 chars (763 bytes).
        _row(Attr.USERNAME, _text(Attr.USERNAME, 513)),
        _row(Attr.REALM, _text(Attr.REALM, 763)),
        _row(Attr.NONCE, _text(Attr.NONCE, 763)),
        _row(Attr.SOFTWARE, _text(Attr.SOFTWARE, 763)),
        _row(Attr.MESSAGE_INTEGRITY, _raw(Attr.MESSAGE_INTEGRITY, lambda n: n == 20)),
        # RFC 8489 §14.6: 16 to 32 bytes, a multiple of 4.
        _row(
            Attr.MESSAGE_INTEGRITY_SHA256,
            _raw(Attr.MESSAGE_INTEGRITY_SHA256, lambda n: 16 <= n <= 32 and n % 4 == 0),
        ),
        _row(Attr.FINGERPRINT, _uint(Attr.FINGERPRINT, 4)),
        _row(Attr.ERROR_CODE, (_decode_error_code, _encode_error_code)),
        _row(Attr.ADDRESS_ERROR_CODE, (_decode_address_error_code, _encode_address_error_code)),
        _row(Attr.UNKNOWN_ATTRIBUTES, (_decode_unknown, _encode_unknown)),
        _row(Attr.LIFETIME, _uint(Attr.LIFETIME, 4)),
        _row(Attr.DATA, _raw(Attr.DATA)),
        _row(
            Attr.CHANNEL_NUMBER, (_decode_channel, lambda v, tid: bytes((v >> 8, v & 0xFF, 0, 0)))
        ),
        _row(Attr.EVEN_PORT, (_decode_even_port, lambda v, tid: b"\x80" if v else b"\x00")),
        _row(Attr.RESERVATION_TOKEN, _raw(Attr.RESERVATION_TOKEN, lambda n: n == 8)),
        _row(Attr.REQUESTED_TRANSPORT, _octet_rffu(Attr.REQUESTED_TRANSPORT)),
        _row(Attr.REQUESTED_ADDRESS_FAMILY, _octet_rffu(Attr.REQUESTED_ADDRESS_FAMILY)),
        _row(Attr.ADDITIONAL_ADDRESS_FAMILY, _octet_rffu(Attr.ADDITIONAL_ADDRESS_FAMILY)),
        _row(Attr.PRIORITY, _uint(Attr.PRIORITY, 4)),
        _row(Attr.USE_CANDIDATE, (_decode_flag, lambda v, tid: b"")),
        _row(Attr.ICE_CONTROLLED, _uint(Attr.ICE_CONTROLLED, 8)),
        _row(Attr.ICE_CONTROLLING, _uint(Attr.ICE_CONTROLLING, 8)),
    ]
)

_NAMES: dict[int, str] = {int(a): a.name.replace("_", "-") for a in Attr}


def attr_name(attr_type: int) -> str:
    """Human name of an attribute type, e.g. ``XOR-PEER-ADDRESS`` or ``0x7f01``."""
    return _NAMES.get(attr_type, f"0x{attr_type:04x}")
