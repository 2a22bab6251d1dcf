"""TurnServer under hostile input: bad bytes are dropped or answered, counted, never raised."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from turn_harness import CLIENT, NOW0, PEER, Client, drain, error_code, make_server

from firezone.proto.stun import Attr, Class, Message, Method, encode_channel_data
from firezone.proto.turn import SendToPeer, TurnServer

ATTACKER = ("198.51.100.66", 6666)


def serving_pair() -> tuple[TurnServer, Client, int]:
    server = make_server()
    c = Client(server)
    _, port = c.relayed(c.allocate())
    c.request(Method.CHANNEL_BIND, [(Attr.CHANNEL_NUMBER, 0x4001), (Attr.XOR_PEER_ADDRESS, PEER)])
    return server, c, port


def still_serving(server: TurnServer, c: Client, port: int, now: float = NOW0 + 1) -> None:
    frame = encode_channel_data(0x4001, b"alive")
    assert server.relay_channel_data(frame, CLIENT) == (b"alive", PEER, port)
    assert c.send_raw(frame, now) == [SendToPeer(b"alive", PEER, port, 4)]
    assert server.relay_peer_data(b"back", PEER, port) == (b"\x40\x01\x00\x04back", CLIENT)
    assert server.stats.drops.get("internal_error", 0) == 0


def test_truncated_stun_is_dropped_and_counted() -> None:
    server, c, port = serving_pair()
    data = c.build(Method.REFRESH, []).encode(key=c.key)
    for n in range(1, len(data)):
        server.handle_client_datagram(data[:n], ATTACKER, NOW0)
    assert drain(server) == []
    assert sum(server.stats.drops.values()) == len(data) - 1
    still_serving(server, c, port)


def test_wrong_fingerprint_is_dropped() -> None:
    server, c, port = serving_pair()
    data = bytearray(c.build(Method.REFRESH, []).encode(key=c.key))
    data[-1] ^= 0xFF
    server.handle_client_datagram(bytes(data), CLIENT, NOW0)
    assert drain(server) == [] and server.stats.drops["malformed_stun"] == 1
    still_serving(server, c, port)


def test_wrong_integrity_is_401_and_changes_nothing() -> None:
    server, c, port = serving_pair()
    msg = c.build(Method.REFRESH, [(Attr.LIFETIME, 0)])
    c.send_raw(msg.encode(key=b"\x00" * 16), NOW0)
    assert error_code(c.reply()) == 401
    assert server.stats.auth_failures == 1 and server.allocation_count == 1
    still_serving(server, c, port)


def test_responses_and_odd_indications_from_clients_are_dropped() -> None:
    server, c, port = serving_pair()
    for cls in (Class.SUCCESS, Class.ERROR):
        server.handle_client_datagram(
            Message(Method.ALLOCATE, cls, b"r" * 12).encode(), ATTACKER, NOW0
        )
    server.handle_client_datagram(
        Message(Method.DATA, Class.INDICATION, b"r" * 12).encode(), ATTACKER, NOW0
    )
    assert drain(server) == []
    assert server.stats.drops["unexpected_response"] == 2
    assert server.stats.drops["unexpected_indication"] == 1
    still_serving(server, c, port)


def test_empty_and_non_stun_datagrams_are_dropped() -> None:
    server, c, port = serving_pair()
    for data in (b"", b"\x80" * 40, b"\xff", b"\x01\x00"):
        server.handle_client_datagram(data, ATTACKER, NOW0)
    assert drain(server) == []
    assert server.stats.drops["empty"] == 1
    assert server.stats.drops["not_stun_or_channel_data"] == 2
    assert server.stats.drops["malformed_stun"] == 1
    still_serving(server, c, port)


def test_attacker_channel_data_with_a_bound_number_goes_nowhere() -> None:
    server, c, port = serving_pair()
    frame = encode_channel_data(0x4001, b"spoof")
    assert server.relay_channel_data(frame, ATTACKER) is None
    server.handle_client_datagram(frame, ATTACKER, NOW0)
    assert drain(server) == []
    still_serving(server, c, port)


def test_peer_data_to_unknown_port_and_from_unpermitted_peer() -> None:
    server, c, port = serving_pair()
    server.handle_peer_datagram(b"x", PEER, 1, 4, NOW0)
    server.handle_peer_datagram(b"x", ("192.0.2.99", 1), port, 4, NOW0)
    assert drain(server) == []
    assert server.stats.drops["peer_data_without_allocation"] == 1
    assert server.stats.drops["peer_without_permission"] == 1
    still_serving(server, c, port)


_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@given(st.binary(max_size=200), st.booleans())
@_SETTINGS
def test_random_bytes_never_raise(data: bytes, as_client: bool) -> None:
    server, c, port = serving_pair()
    if as_client:
        server.handle_client_datagram(data, ATTACKER, NOW0)
        server.handle_client_datagram(data, CLIENT, NOW0)
        server.relay_channel_data(data, CLIENT)
    else:
        server.handle_peer_datagram(data, ("192.0.2.99", 1), port, 4, NOW0)
        server.relay_peer_data(data, ("192.0.2.99", 1), port)
    drain(server)
    still_serving(server, c, port)


def _stun_like(body: bytes) -> bytes:
    return b"\x00\x03" + len(body).to_bytes(2, "big") + b"\x21\x12\xa4\x42" + b"t" * 12 + body


@given(st.binary(max_size=120))
@_SETTINGS
def test_random_attribute_blocks_never_raise(body: bytes) -> None:
    server, c, port = serving_pair()
    server.handle_client_datagram(_stun_like(body), ATTACKER, NOW0)
    server.handle_client_datagram(_stun_like(body + b"\x00" * (-len(body) % 4)), CLIENT, NOW0)
    drain(server)
    still_serving(server, c, port)


requests = st.sampled_from(
    [
        (Method.REFRESH, [(Attr.LIFETIME, 700)]),
        (Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, PEER)]),
        (Method.CHANNEL_BIND, [(Attr.CHANNEL_NUMBER, 0x4001), (Attr.XOR_PEER_ADDRESS, PEER)]),
        (Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, 17)]),
        (Method.SEND, []),
    ]
)


@given(requests, st.lists(st.integers(0, 10_000), min_size=1, max_size=6), st.booleans())
@_SETTINGS
def test_mutated_authenticated_requests_never_raise(
    req: tuple[Method, list[tuple[int, object]]], flips: list[int], from_attacker: bool
) -> None:
    server, c, port = serving_pair()
    method, attrs = req
    data = bytearray(c.build(method, attrs).encode(key=c.key))
    for f in flips:
        data[f % len(data)] ^= 1 << (f % 8)
    server.handle_client_datagram(bytes(data), ATTACKER if from_attacker else CLIENT, NOW0)
    drain(server)
    # Whatever the mutation did to the allocation (e.g. a valid request survived), the relay
    # keeps serving a fresh binding of the same user.
    if server.allocation_count and server.relay_channel_data(
        encode_channel_data(0x4001, b"a"), CLIENT
    ):
        still_serving(server, c, port)
    assert server.stats.drops.get("internal_error", 0) == 0
