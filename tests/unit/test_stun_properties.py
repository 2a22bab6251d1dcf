"""Hypothesis: every attribute round-trips through encode/parse; garbage only raises ParseError."""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from firezone.proto.stun import (
    ATTRIBUTES,
    AddressErrorCode,
    Attr,
    Class,
    ErrorCode,
    Message,
    Method,
    ParseError,
    encode_channel_data,
    long_term_key,
    parse_channel_data,
    parse_message,
    verify_integrity,
)

ips = st.one_of(
    st.builds(lambda n: str(ipaddress.IPv4Address(n)), st.integers(0, 2**32 - 1)),
    st.builds(lambda n: str(ipaddress.IPv6Address(n)), st.integers(0, 2**128 - 1)),
)
addresses = st.tuples(ips, st.integers(0, 65535))
text = st.text(max_size=40)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
reason = st.text(max_size=30)

VALUES: dict[int, st.SearchStrategy[Any]] = {
    Attr.MAPPED_ADDRESS: addresses,
    Attr.XOR_MAPPED_ADDRESS: addresses,
    Attr.XOR_PEER_ADDRESS: addresses,
    Attr.XOR_RELAYED_ADDRESS: addresses,
    Attr.USERNAME: text,
    Attr.REALM: text,
    Attr.NONCE: text,
    Attr.SOFTWARE: text,
    Attr.ERROR_CODE: st.builds(ErrorCode, st.integers(300, 699), reason),
    Attr.ADDRESS_ERROR_CODE: st.builds(
        AddressErrorCode, st.sampled_from([1, 2]), st.integers(300, 699), reason
    ),
    Attr.UNKNOWN_ATTRIBUTES: st.lists(st.integers(0, 0xFFFF), max_size=6).map(tuple),
    Attr.LIFETIME: u32,
    Attr.DATA: st.binary(max_size=200),
    Attr.CHANNEL_NUMBER: st.integers(0, 0xFFFF),
    Attr.REQUESTED_TRANSPORT: st.integers(0, 255),
    Attr.EVEN_PORT: st.booleans(),
    Attr.RESERVATION_TOKEN: st.binary(min_size=8, max_size=8),
    Attr.REQUESTED_ADDRESS_FAMILY: st.sampled_from([1, 2]),
    Attr.ADDITIONAL_ADDRESS_FAMILY: st.sampled_from([1, 2]),
    Attr.PRIORITY: u32,
    Attr.USE_CANDIDATE: st.just(True),
    Attr.ICE_CONTROLLED: u64,
    Attr.ICE_CONTROLLING: u64,
}
# Integrity and fingerprint are produced by encode() itself (tested below).
SKIPPED = {Attr.MESSAGE_INTEGRITY, Attr.MESSAGE_INTEGRITY_SHA256, Attr.FINGERPRINT}


def test_every_table_attribute_has_a_strategy() -> None:
    assert set(ATTRIBUTES) - SKIPPED == set(VALUES)


attribute = st.sampled_from(sorted(VALUES)).flatmap(lambda t: st.tuples(st.just(t), VALUES[t]))
transaction_ids = st.binary(min_size=12, max_size=12)


@given(
    method=st.sampled_from(list(Method)),
    cls=st.sampled_from(list(Class)),
    tid=transaction_ids,
    attrs=st.lists(attribute, max_size=8),
    key=st.none() | st.binary(min_size=1, max_size=32),
    sha256=st.booleans(),
    fingerprint=st.booleans(),
)
def test_round_trip(
    method: Method,
    cls: Class,
    tid: bytes,
    attrs: list[tuple[int, Any]],
    key: bytes | None,
    sha256: bool,
    fingerprint: bool,
) -> None:
    msg = Message(method, cls, tid, list(attrs))
    parsed = parse_message(msg.encode(key=key, sha256=sha256, fingerprint=fingerprint))
    assert (parsed.method, parsed.cls, parsed.transaction_id) == (method, cls, tid)
    body = [(t, v) for t, v in parsed.attributes if t not in SKIPPED]
    assert body == attrs
    assert (Attr.FINGERPRINT in parsed) == fingerprint
    if key is not None:
        assert verify_integrity(parsed, key)
        assert not verify_integrity(parsed, key + b"x")


@given(st.binary(max_size=300))
@settings(max_examples=500)
def test_garbage_only_raises_parse_error(data: bytes) -> None:
    try:
        parse_message(data)
    except ParseError:
        pass
    try:
        parse_channel_data(data)
    except ParseError:
        pass


@given(
    tid=transaction_ids,
    attrs=st.lists(attribute, max_size=6),
    flips=st.lists(st.integers(0, 10_000), min_size=1, max_size=4),
)
@settings(max_examples=300)
def test_mutated_messages_raise_parse_error_or_fail_integrity(
    tid: bytes, attrs: list[tuple[int, Any]], flips: list[int]
) -> None:
    key = long_term_key("u", "r", "p")
    data = bytearray(Message(Method.ALLOCATE, Class.REQUEST, tid, list(attrs)).encode(key=key))
    for f in flips:
        data[f % len(data)] ^= 1 << (f % 8)
    try:
        msg = parse_message(bytes(data))
    except ParseError:
        return
    # A mutation that survived parsing cannot keep both fingerprint and integrity valid, unless
    # the flips cancelled out.
    assert bytes(data) == Message(Method.ALLOCATE, Class.REQUEST, tid, list(attrs)).encode(
        key=key
    ) or not (verify_integrity(msg, key) and Attr.FINGERPRINT in msg)


@given(st.integers(0x4000, 0x7FFF), st.binary(max_size=1500), st.integers(0, 3))
def test_channel_data_round_trip(channel: int, payload: bytes, pad: int) -> None:
    data = encode_channel_data(channel, payload)
    padded = data + b"\x00" * min(pad, (4 - len(payload) % 4) % 4)
    got_channel, got = parse_channel_data(padded)
    assert (got_channel, bytes(got)) == (channel, payload)
