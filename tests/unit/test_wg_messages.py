"""Message codecs: exact layouts, exact errors, round trips and garbage."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firezone.proto.wireguard import (
    CookieReply,
    HandshakeInitiation,
    HandshakeResponse,
    ParseError,
    TransportData,
    parse_message,
)

u32 = st.integers(0, 0xFFFFFFFF)


def b(n: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=n, max_size=n)


initiations = st.builds(HandshakeInitiation, u32, b(32), b(48), b(28), b(16), b(16))
responses = st.builds(HandshakeResponse, u32, u32, b(32), b(16), b(16), b(16))
cookies = st.builds(CookieReply, u32, b(24), b(32))
transports = st.builds(
    TransportData, u32, st.integers(0, (1 << 64) - 1), st.binary(min_size=16, max_size=200)
)


@given(st.one_of(initiations, responses, cookies, transports))
def test_round_trip(msg: object) -> None:
    data = msg.to_bytes()  # type: ignore[attr-defined]
    assert parse_message(data) == msg
    assert parse_message(memoryview(data)) == msg


@given(st.binary(max_size=300))
def test_garbage_raises_only_parse_error(data: bytes) -> None:
    try:
        msg = parse_message(data)
    except ParseError:
        return
    assert msg.to_bytes() == data  # anything accepted re-encodes to the same bytes


def test_layout_sizes_and_type_field() -> None:
    init = HandshakeInitiation(0x01020304, bytes(32), bytes(48), bytes(28)).to_bytes()
    assert len(init) == 148 and init[:8] == b"\x01\x00\x00\x00\x04\x03\x02\x01"
    resp = HandshakeResponse(1, 2, bytes(32), bytes(16)).to_bytes()
    assert len(resp) == 92 and resp[:12] == b"\x02\x00\x00\x00\x01\x00\x00\x00\x02\x00\x00\x00"
    cookie = CookieReply(7, bytes(24), bytes(32)).to_bytes()
    assert len(cookie) == 64 and cookie[:8] == b"\x03\x00\x00\x00\x07\x00\x00\x00"
    data = TransportData(5, 0x0102, bytes(16)).to_bytes()
    assert data[:16] == b"\x04\x00\x00\x00\x05\x00\x00\x00\x02\x01\x00\x00\x00\x00\x00\x00"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "datagram shorter than the 4-byte message type"),
        (b"\x01\x00\x00\x00" + bytes(10), "handshake initiation must be 148 bytes, got 14"),
        (b"\x02\x00\x00\x00" + bytes(100), "handshake response must be 92 bytes, got 104"),
        (b"\x03\x00\x00\x00", "cookie reply must be 64 bytes, got 4"),
        (b"\x04\x00\x00\x00" + bytes(20), "transport data must be at least 32 bytes, got 24"),
        (b"\x05\x00\x00\x00" + bytes(40), "unknown message type 0x5"),
        (b"\x01\x00\x00\x01" + bytes(144), "unknown message type 0x1000001"),
    ],
)
def test_parse_errors_are_exact(data: bytes, message: str) -> None:
    with pytest.raises(ParseError) as exc:
        parse_message(data)
    assert str(exc.value) == message
    assert isinstance(exc.value, ValueError)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (
            lambda: HandshakeInitiation(0, bytes(31), bytes(48), bytes(28)),
            "ephemeral must be 32 bytes, got 31",
        ),
        (lambda: HandshakeResponse(-1, 0, bytes(32), bytes(16)), "sender must fit in 32 bits"),
        (lambda: CookieReply(0, bytes(23), bytes(32)), "nonce must be 24 bytes, got 23"),
        (lambda: TransportData(0, 1 << 64, bytes(16)), "counter must fit in 64 bits"),
        (
            lambda: TransportData(0, 0, bytes(15)),
            "encrypted_packet must hold at least the 16-byte tag",
        ),
    ],
)
def test_invalid_messages_cannot_be_built(factory: object, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        factory()  # type: ignore[operator]
    assert str(exc.value) == message
