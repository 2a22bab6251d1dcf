"""WireGuard message codecs (whitepaper §5.4.2–§5.4.7): four fixed layouts, little-endian fields.

Every message starts with a 32-bit little-endian type (1..4), i.e. one type byte and three zero
bytes. Handshake messages end with mac1 and mac2 over the bytes before them. Transport messages
are parsed inline on the hot path by :mod:`firezone.proto.wireguard.tunnel`; the dataclass here is
for tests and tools.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "COOKIE_REPLY_LEN",
    "INITIATION_LEN",
    "MSG_COOKIE_REPLY",
    "MSG_INITIATION",
    "MSG_RESPONSE",
    "MSG_TRANSPORT",
    "RESPONSE_LEN",
    "TRANSPORT_HEADER_LEN",
    "TRANSPORT_MIN_LEN",
    "CookieReply",
    "HandshakeInitiation",
    "HandshakeResponse",
    "Message",
    "ParseError",
    "TransportData",
    "parse_message",
]

MSG_INITIATION = 1
MSG_RESPONSE = 2
MSG_COOKIE_REPLY = 3
MSG_TRANSPORT = 4

INITIATION_LEN = 148
RESPONSE_LEN = 92
COOKIE_REPLY_LEN = 64
TRANSPORT_HEADER_LEN = 16
TAG_LEN = 16
TRANSPORT_MIN_LEN = TRANSPORT_HEADER_LEN + TAG_LEN  # a keepalive

# Offsets of mac1 within each handshake message; mac2 follows it (16 bytes each).
INITIATION_MAC1_OFF = 116
RESPONSE_MAC1_OFF = 60

_INITIATION = struct.Struct("<I I 32s 48s 28s 16s 16s")
_RESPONSE = struct.Struct("<I I I 32s 16s 16s 16s")
_COOKIE = struct.Struct("<I I 24s 32s")
TRANSPORT_HEADER = struct.Struct("<IIQ")


class ParseError(ValueError):
    """A datagram is not a well-formed WireGuard message."""


def _check(name: str, value: bytes, n: int) -> None:
    if len(value) != n:
        raise ValueError(f"{name} must be {n} bytes, got {len(value)}")


def _check_index(name: str, value: int) -> None:
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{name} must fit in 32 bits")


@dataclass(frozen=True, slots=True)
class HandshakeInitiation:
    """Message type 1: initiator -> responder, 148 bytes."""

    sender: int
    ephemeral: bytes
    encrypted_static: bytes
    encrypted_timestamp: bytes
    mac1: bytes = bytes(16)
    mac2: bytes = bytes(16)

    def __post_init__(self) -> None:
        _check_index("sender", self.sender)
        _check("ephemeral", self.ephemeral, 32)
        _check("encrypted_static", self.encrypted_static, 48)
        _check("encrypted_timestamp", self.encrypted_timestamp, 28)
        _check("mac1", self.mac1, 16)
        _check("mac2", self.mac2, 16)

    def to_bytes(self) -> bytes:
        return _INITIATION.pack(
            MSG_INITIATION, self.sender, self.ephemeral, self.encrypted_static,
            self.encrypted_timestamp, self.mac1, self.mac2,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class HandshakeResponse:
    """Message type 2: responder -> initiator, 92 bytes."""

    sender: int
    receiver: int
    ephemeral: bytes
    encrypted_nothing: bytes
    mac1: bytes = bytes(16)
    mac2: bytes = bytes(16)

    def __post_init__(self) -> None:
        _check_index("sender", self.sender)
        _check_index("receiver", self.receiver)
        _check("ephemeral", self.ephemeral, 32)
        _check("encrypted_nothing", self.encrypted_nothing, 16)
        _check("mac1", self.mac1, 16)
        _check("mac2", self.mac2, 16)

    def to_bytes(self) -> bytes:
        return _RESPONSE.pack(
            MSG_RESPONSE, self.sender, self.receiver, self.ephemeral,
            self.encrypted_nothing, self.mac1, self.mac2,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class CookieReply:
    """Message type 3: sent instead of a response when under load, 64 bytes."""

    receiver: int
    nonce: bytes
    encrypted_cookie: bytes

    def __post_init__(self) -> None:
        _check_index("receiver", self.receiver)
        _check("nonce", self.nonce, 24)
        _check("encrypted_cookie", self.encrypted_cookie, 32)

    def to_bytes(self) -> bytes:
        return _COOKIE.pack(MSG_COOKIE_REPLY, self.receiver, self.nonce, self.encrypted_cookie)


@dataclass(frozen=True, slots=True)
class TransportData:
    """Message type 4: header plus an AEAD box of the padded IP packet (>= 32 bytes)."""

    receiver: int
    counter: int
    encrypted_packet: bytes

    def __post_init__(self) -> None:
        _check_index("receiver", self.receiver)
        if not 0 <= self.counter < 1 << 64:
            raise ValueError("counter must fit in 64 bits")
        if len(self.encrypted_packet) < TAG_LEN:
            raise ValueError("encrypted_packet must hold at least the 16-byte tag")

    def to_bytes(self) -> bytes:
        return TRANSPORT_HEADER.pack(MSG_TRANSPORT, self.receiver, self.counter) + bytes(
            self.encrypted_packet
        )


Message = HandshakeInitiation | HandshakeResponse | CookieReply | TransportData


def parse_message(data: bytes | memoryview) -> Message:
    """Decode one WireGuard datagram; raises ParseError with an exact message."""
    data = bytes(data)
    if len(data) < 4:
        raise ParseError("datagram shorter than the 4-byte message type")
    (mtype,) = struct.unpack_from("<I", data)
    if mtype == MSG_INITIATION:
        if len(data) != INITIATION_LEN:
            raise ParseError(f"handshake initiation must be 148 bytes, got {len(data)}")
        _, sender, eph, st, ts, m1, m2 = _INITIATION.unpack(data)
        return HandshakeInitiation(sender, eph, st, ts, m1, m2)
    if mtype == MSG_RESPONSE:
        if len(data) != RESPONSE_LEN:
            raise ParseError(f"handshake response must be 92 bytes, got {len(data)}")
        _, sender, receiver, eph, empty, m1, m2 = _RESPONSE.unpack(data)
        return HandshakeResponse(sender, receiver, eph, empty, m1, m2)
    if mtype == MSG_COOKIE_REPLY:
        if len(data) != COOKIE_REPLY_LEN:
            raise ParseError(f"cookie reply must be 64 bytes, got {len(data)}")
        _, receiver, nonce, cookie = _COOKIE.unpack(data)
        return CookieReply(receiver, nonce, cookie)
    if mtype == MSG_TRANSPORT:
        if len(data) < TRANSPORT_MIN_LEN:
            raise ParseError(f"transport data must be at least 32 bytes, got {len(data)}")
        _, receiver, counter = TRANSPORT_HEADER.unpack_from(data)
        return TransportData(receiver, counter, data[TRANSPORT_HEADER_LEN:])
    raise ParseError(f"unknown message type {mtype:#x}")
