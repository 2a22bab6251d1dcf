"""STUN codec: RFC 5769 vectors, exact parse errors, integrity, fingerprint, ChannelData."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from firezone.proto.stun import (
    AddressErrorCode,
    Attr,
    AttributeParseError,
    ChannelDataError,
    Class,
    ErrorCode,
    FingerprintError,
    Message,
    MessageLengthError,
    Method,
    NotStunError,
    ParseError,
    encode_channel_data,
    error_response,
    is_channel_data,
    is_stun,
    long_term_key,
    parse_channel_data,
    parse_message,
    success_response,
    verify_integrity,
)

VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "rfc5769.json").read_text())
TID = bytes(range(12))


def vec(name: str) -> bytes:
    return bytes.fromhex(VECTORS[name]["hex"])


# -- RFC 5769 ------------------------------------------------------------------------------------


def test_rfc5769_sample_request() -> None:
    v = VECTORS["sample_request"]
    msg = parse_message(vec("sample_request"))
    assert (msg.method, msg.cls) == (Method.BINDING, Class.REQUEST)
    assert msg.transaction_id == bytes.fromhex("b7e7a701bc34d686fa87dfae")
    assert msg.get(Attr.SOFTWARE) == v["software"]
    assert msg.get(Attr.USERNAME) == v["username"]
    assert msg.get(Attr.PRIORITY) == v["priority"]
    assert msg.get(Attr.ICE_CONTROLLED) == v["ice_controlled"]
    assert verify_integrity(msg, v["password"].encode())
    assert not verify_integrity(msg, b"wrong password")


@pytest.mark.parametrize("name", ["ipv4_response", "ipv6_response"])
def test_rfc5769_responses(name: str) -> None:
    v = VECTORS[name]
    msg = parse_message(vec(name))
    assert (msg.method, msg.cls) == (Method.BINDING, Class.SUCCESS)
    assert msg.get(Attr.SOFTWARE) == v["software"]
    assert msg.get(Attr.XOR_MAPPED_ADDRESS) == tuple(v["mapped"])
    assert verify_integrity(msg, v["password"].encode())


def test_rfc5769_long_term_request() -> None:
    v = VECTORS["long_term_request"]
    msg = parse_message(vec("long_term_request"))
    assert msg.get(Attr.USERNAME) == v["username"]
    assert msg.get(Attr.NONCE) == v["nonce"]
    assert msg.get(Attr.REALM) == v["realm"]
    assert Attr.FINGERPRINT not in msg
    key = long_term_key(v["username"], v["realm"], v["password_saslprep"])
    assert verify_integrity(msg, key)
    assert not verify_integrity(msg, long_term_key(v["username"], v["realm"], "thematrix"))


@pytest.mark.parametrize("name", ["sample_request", "ipv4_response", "ipv6_response"])
def test_reencoding_a_vector_keeps_integrity_and_values(name: str) -> None:
    v = VECTORS[name]
    msg = parse_message(vec(name))
    again = parse_message(msg.encode(key=v["password"].encode()))
    assert verify_integrity(again, v["password"].encode())
    plain = [
        (t, x) for t, x in msg.attributes if t not in (Attr.MESSAGE_INTEGRITY, Attr.FINGERPRINT)
    ]
    assert [
        (t, x) for t, x in again.attributes if t not in (Attr.MESSAGE_INTEGRITY, Attr.FINGERPRINT)
    ] == plain


def test_vector_with_one_flipped_byte_fails_fingerprint() -> None:
    data = bytearray(vec("sample_request"))
    data[30] ^= 0x01  # inside SOFTWARE
    with pytest.raises(FingerprintError, match="^FINGERPRINT mismatch$"):
        parse_message(bytes(data))


# -- message type bits ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(Method))
@pytest.mark.parametrize("cls", list(Class))
def test_method_and_class_round_trip(method: Method, cls: Class) -> None:
    msg = parse_message(Message(method, cls, TID).encode())
    assert (msg.method, msg.cls) == (method, cls)


def test_known_type_values() -> None:
    # RFC 8489 §5: Binding request 0x0001, success 0x0101, error 0x0111; RFC 8656 Send ind. 0x0016
    assert Message(Method.BINDING, Class.SUCCESS, TID).encode(fingerprint=False)[:2] == b"\x01\x01"
    assert Message(Method.BINDING, Class.ERROR, TID).encode(fingerprint=False)[:2] == b"\x01\x11"
    assert Message(Method.SEND, Class.INDICATION, TID).encode(fingerprint=False)[:2] == b"\x00\x16"
    assert Message(Method.ALLOCATE, Class.REQUEST, TID).encode(fingerprint=False)[:2] == b"\x00\x03"


def test_unknown_method_is_kept_as_int() -> None:
    msg = parse_message(Message(0x0A0, Class.REQUEST, TID).encode())
    assert msg.method == 0x0A0


# -- exact parse errors --------------------------------------------------------------------------


def header(length: int, *, mtype: int = 1, cookie: int = 0x2112A442) -> bytes:
    return struct.pack("!HHI", mtype, length, cookie) + TID


@pytest.mark.parametrize(
    ("data", "exc", "message"),
    [
        (b"\x00\x01\x00", NotStunError, "STUN message shorter than the 20-byte header"),
        (header(0, mtype=0x8001), NotStunError, "first two bits of a STUN message must be zero"),
        (header(0, cookie=0x2112A443), NotStunError, "magic cookie mismatch"),
        (header(3) + b"abc", MessageLengthError, "STUN message length is not a multiple of 4"),
        (
            header(8) + b"\x80\x22\x00\x00",
            MessageLengthError,
            "STUN message length 8 does not match the 4 bytes after the header",
        ),
        (header(4) + b"\x80\x22\x00\x05", AttributeParseError, "attribute 0x8022 value truncated"),
        (header(8) + b"\x80\x22\x00\x03abc\x00", None, None),
        (
            header(12) + b"\x00\x20\x00\x08\x00\x03\x00\x00\x00\x00\x00\x00",
            AttributeParseError,
            "XOR-MAPPED-ADDRESS: unknown address family 3",
        ),
        (
            header(12) + b"\x00\x20\x00\x08\x00\x02\x00\x00\x00\x00\x00\x00",
            AttributeParseError,
            "XOR-MAPPED-ADDRESS: IPv6 address needs 20 bytes",
        ),
        (
            header(8) + b"\x00\x0d\x00\x02\x00\x01\x00\x00",
            AttributeParseError,
            "LIFETIME: value must be 4 bytes, got 2",
        ),
        (
            header(8) + b"\x00\x06\x00\x02\xff\xfe\x00\x00",
            AttributeParseError,
            "USERNAME: not UTF-8",
        ),
        (
            header(8) + b"\x00\x09\x00\x04\x00\x00\x02\x00",
            AttributeParseError,
            "ERROR-CODE: invalid code 200",
        ),
        (header(4) + b"\x00\x25\x00\x00", None, None),
        (
            header(8) + b"\x00\x25\x00\x01\x01\x00\x00\x00",
            AttributeParseError,
            "USE-CANDIDATE: value must be empty",
        ),
        (
            header(8) + b"\x00\x0a\x00\x03\x00\x01\x02\x00",
            AttributeParseError,
            "UNKNOWN-ATTRIBUTES: odd length",
        ),
        (
            header(16) + b"\x80\x28\x00\x04\x00\x00\x00\x00\x80\x22\x00\x00" + b"\x00\x00\x00\x00",
            FingerprintError,
            "FINGERPRINT is not the last attribute",
        ),
        (header(8) + b"\x80\x28\x00\x04\x00\x00\x00\x00", FingerprintError, "FINGERPRINT mismatch"),
        (
            header(8) + b"\x00\x08\x00\x04abcd",
            AttributeParseError,
            "MESSAGE-INTEGRITY: bad length 4",
        ),
    ],
)
def test_parse_errors_are_exact(
    data: bytes, exc: type[ParseError] | None, message: str | None
) -> None:
    if exc is None:
        parse_message(data)
        return
    with pytest.raises(exc) as info:
        parse_message(data)
    assert str(info.value) == message
    assert isinstance(info.value, ParseError) and isinstance(info.value, ValueError)


def test_attribute_parse_error_names_the_type() -> None:
    with pytest.raises(AttributeParseError) as info:
        parse_message(header(8) + b"\x00\x0d\x00\x02\x00\x01\x00\x00")
    assert info.value.attr_type == Attr.LIFETIME


def test_every_truncation_of_a_valid_message_raises_parse_error() -> None:
    data = vec("sample_request")
    for n in range(len(data)):
        with pytest.raises(ParseError):
            parse_message(data[:n])


# -- integrity and fingerprint -------------------------------------------------------------------


def test_integrity_sha256_round_trip() -> None:
    key = long_term_key("user", "realm", "pass")
    msg = Message(Method.REFRESH, Class.REQUEST, TID).add(Attr.LIFETIME, 0)
    parsed = parse_message(msg.encode(key=key, sha256=True))
    assert Attr.MESSAGE_INTEGRITY_SHA256 in parsed and Attr.MESSAGE_INTEGRITY not in parsed
    assert verify_integrity(parsed, key)
    assert not verify_integrity(parsed, key[::-1])


def test_long_term_key_is_md5_of_user_realm_password() -> None:
    assert long_term_key("user", "realm", "pass").hex() == "8493fbc53ba582fb4c044c456bdc40eb"


def test_integrity_detects_tampering_before_it() -> None:
    key = b"k" * 16
    data = bytearray(
        Message(Method.BINDING, Class.REQUEST, TID)
        .add(Attr.SOFTWARE, "abcd")
        .encode(key=key, fingerprint=False)
    )
    data[24] = ord("x")
    assert not verify_integrity(parse_message(bytes(data)), key)


def test_attributes_after_integrity_are_ignored() -> None:
    key = b"k" * 16
    base = Message(Method.BINDING, Class.REQUEST, TID).encode(key=key, fingerprint=False)
    extra = b"\x80\x22\x00\x04evil"
    data = bytearray(base + extra)
    data[2:4] = (len(data) - 20).to_bytes(2, "big")
    msg = parse_message(bytes(data))
    assert Attr.SOFTWARE not in msg
    assert verify_integrity(msg, key)


def test_message_without_integrity_never_verifies() -> None:
    assert not verify_integrity(
        parse_message(Message(Method.BINDING, Class.REQUEST, TID).encode()), b"k"
    )
    assert not verify_integrity(Message(Method.BINDING, Class.REQUEST, TID), b"k")


def test_encode_drops_stale_integrity_and_fingerprint_attributes() -> None:
    msg = parse_message(vec("sample_request"))
    out = parse_message(msg.encode(fingerprint=False))
    assert Attr.MESSAGE_INTEGRITY not in out and Attr.FINGERPRINT not in out


def test_is_stun() -> None:
    assert is_stun(vec("sample_request"))
    assert not is_stun(vec("sample_request")[:19])
    assert not is_stun(b"\x40" + vec("sample_request")[1:])
    assert not is_stun(b"\x01" * 20)


# -- unknown attributes --------------------------------------------------------------------------


def test_unknown_attributes_are_kept_raw_and_reported_when_required() -> None:
    msg = (
        Message(Method.ALLOCATE, Class.REQUEST, TID)
        .add(0x7F01, b"\x01\x02\x03")
        .add(0xC001, b"opt")
    )
    parsed = parse_message(msg.encode())
    assert parsed.get(0x7F01) == b"\x01\x02\x03"
    assert parsed.get(0xC001) == b"opt"
    assert parsed.unknown_comprehension_required() == [0x7F01]


def test_dont_fragment_is_unknown_required() -> None:
    msg = (
        Message(Method.ALLOCATE, Class.REQUEST, TID)
        .add(Attr.DONT_FRAGMENT, b"")
        .add(Attr.EVEN_PORT, True)
        .add(Attr.RESERVATION_TOKEN, b"12345678")
    )
    parsed = parse_message(msg.encode())
    assert parsed.unknown_comprehension_required() == [Attr.DONT_FRAGMENT]
    assert parsed.get(Attr.EVEN_PORT) is True
    assert parsed.get(Attr.RESERVATION_TOKEN) == b"12345678"


def test_even_port_as_coturn_sends_it() -> None:
    # turnutils_uclient's Allocate: REQUESTED-TRANSPORT, LIFETIME 777, EVEN-PORT with R set
    body = bytes.fromhex("001900041100000000 0d0004 00000309 0018000180000000".replace(" ", ""))
    msg = parse_message(struct.pack("!HHI", 3, len(body), 0x2112A442) + TID + body)
    assert msg.get(Attr.EVEN_PORT) is True and msg.unknown_comprehension_required() == []


# -- builders ------------------------------------------------------------------------------------


def test_error_response_has_code_and_reason() -> None:
    req = Message(Method.ALLOCATE, Class.REQUEST, TID)
    err = parse_message(error_response(req, 438).encode())
    assert err.cls == Class.ERROR and err.transaction_id == TID
    assert err.get(Attr.ERROR_CODE) == ErrorCode(438, "Stale Nonce")


def test_success_response_keeps_method_and_tid() -> None:
    req = Message(Method.CHANNEL_BIND, Class.REQUEST, TID)
    ok = success_response(req, [(Attr.LIFETIME, 5)])
    assert (ok.method, ok.cls, ok.transaction_id, ok.get(Attr.LIFETIME)) == (
        Method.CHANNEL_BIND,
        Class.SUCCESS,
        TID,
        5,
    )


def test_address_error_code_round_trip() -> None:
    msg = Message(Method.ALLOCATE, Class.SUCCESS, TID).add(
        Attr.ADDRESS_ERROR_CODE, AddressErrorCode(2, 440, "nope")
    )
    assert parse_message(msg.encode()).get(Attr.ADDRESS_ERROR_CODE) == AddressErrorCode(
        2, 440, "nope"
    )


def test_transaction_id_must_be_12_bytes() -> None:
    with pytest.raises(ValueError, match="transaction_id must be 12 bytes"):
        Message(Method.BINDING, Class.REQUEST, b"short")


# -- ChannelData ---------------------------------------------------------------------------------


def test_channel_data_round_trip() -> None:
    data = encode_channel_data(0x4001, b"hello")
    assert data == b"\x40\x01\x00\x05hello"
    assert is_channel_data(data) and not is_stun(data)
    channel, payload = parse_channel_data(data)
    assert (channel, bytes(payload)) == (0x4001, b"hello")


def test_channel_data_accepts_padding_up_to_four() -> None:
    _channel, payload = parse_channel_data(b"\x40\x01\x00\x05hello\x00\x00\x00")
    assert bytes(payload) == b"hello"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x40\x01\x00", "ChannelData shorter than its 4-byte header"),
        (b"\x40\x01\x00\x06hello", "ChannelData length 6 exceeds the 5 bytes present"),
        (
            b"\x40\x01\x00\x05hello\x00\x00\x00\x00",
            "ChannelData carries 4 bytes beyond its length and padding",
        ),
        (b"\x30\x01\x00\x00", "channel number 0x3001 outside 0x4000-0x7FFF"),
    ],
)
def test_channel_data_errors_are_exact(data: bytes, message: str) -> None:
    with pytest.raises(ChannelDataError) as info:
        parse_channel_data(data)
    assert str(info.value) == message


def test_is_channel_data_range() -> None:
    assert is_channel_data(b"\x40\x00\x00\x00")
    assert is_channel_data(b"\x7f\xff\x00\x00")
    assert not is_channel_data(b"\x80\x00\x00\x00")
    assert not is_channel_data(b"\x3f\xff\x00\x00")
    assert not is_channel_data(b"\x40\x00\x00")
