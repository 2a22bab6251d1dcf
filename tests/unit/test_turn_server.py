"""TurnServer: allocation lifecycle, authentication, errors, permissions, channels, data paths."""

from __future__ import annotations

import pytest
from turn_harness import (
    CLIENT,
    CLIENT6,
    NOW0,
    PEER,
    PEER6,
    PUB4,
    PUB6,
    UNIX0,
    Client,
    drain,
    error_code,
    make_server,
)

from firezone.proto.stun import (
    AddressErrorCode,
    Attr,
    Class,
    Message,
    Method,
    encode_channel_data,
    parse_message,
    verify_integrity,
)
from firezone.proto.turn import (
    CreateAllocationPort,
    FreeAllocationPort,
    SendToClient,
    SendToPeer,
)
from firezone.proto.turn.server import NONCE_LIFETIME

# -- Binding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("addr", [CLIENT, CLIENT6])
def test_binding_is_answered_without_authentication(addr: tuple[str, int]) -> None:
    server = make_server()
    c = Client(server, addr)
    c.send_raw(Message(Method.BINDING, Class.REQUEST, c.tid()).encode(), NOW0)
    resp = c.reply()
    assert resp.cls == Class.SUCCESS
    assert resp.get(Attr.XOR_MAPPED_ADDRESS) == addr
    assert Attr.FINGERPRINT in resp and Attr.MESSAGE_INTEGRITY not in resp
    assert server.stats.binding_requests == 1


def test_binding_indication_is_ignored() -> None:
    server = make_server()
    c = Client(server)
    assert c.send_raw(Message(Method.BINDING, Class.INDICATION, c.tid()).encode(), NOW0) == []


# -- Allocate ------------------------------------------------------------------------------------


def test_allocate_without_integrity_is_challenged() -> None:
    server = make_server()
    c = Client(server)
    c.send_raw(
        Message(Method.ALLOCATE, Class.REQUEST, c.tid()).add(Attr.REQUESTED_TRANSPORT, 17).encode(),
        NOW0,
    )
    resp = c.reply()
    assert error_code(resp) == 401
    assert resp.get(Attr.REALM) == "firezone"
    assert resp.get(Attr.NONCE)
    assert Attr.MESSAGE_INTEGRITY not in resp
    assert server.stats.challenges == 1 and server.stats.auth_failures == 0
    assert server.allocation_count == 0


def test_allocate_success_opens_port_then_answers_signed() -> None:
    server = make_server()
    c = Client(server)
    resp = c.allocate()
    assert resp.cls == Class.SUCCESS
    assert verify_integrity(resp, c.key)
    ip, port = c.relayed(resp)
    assert ip == PUB4 and 49152 <= port <= 65535
    assert resp.get(Attr.LIFETIME) == 600
    assert resp.get(Attr.XOR_MAPPED_ADDRESS) == CLIENT
    assert isinstance(c.commands[0], CreateAllocationPort)
    assert c.commands[0] == CreateAllocationPort(port, 4)
    assert isinstance(c.commands[1], SendToClient)
    assert server.stats.allocations == 1 and server.stats.allocations_created == 1


def test_allocate_ipv6_relayed_address() -> None:
    server = make_server()
    c = Client(server)
    resp = c.allocate(attrs=[(Attr.REQUESTED_ADDRESS_FAMILY, 2)])
    ip, port = c.relayed(resp)
    assert ip == PUB6
    assert CreateAllocationPort(port, 6) in c.commands


def test_allocate_dual_stack_with_additional_family() -> None:
    server = make_server()
    c = Client(server)
    resp = c.allocate(attrs=[(Attr.ADDITIONAL_ADDRESS_FAMILY, 2)])
    relayed = resp.get_all(Attr.XOR_RELAYED_ADDRESS)
    assert [ip for ip, _ in relayed] == [PUB4, PUB6]
    assert relayed[0][1] != relayed[1][1]
    assert {cmd.family for cmd in c.commands if isinstance(cmd, CreateAllocationPort)} == {4, 6}


def test_additional_family_without_ipv6_gives_address_error_code() -> None:
    server = make_server(public_ip6=None)
    c = Client(server)
    resp = c.allocate(attrs=[(Attr.ADDITIONAL_ADDRESS_FAMILY, 2)])
    assert resp.cls == Class.SUCCESS
    assert [ip for ip, _ in resp.get_all(Attr.XOR_RELAYED_ADDRESS)] == [PUB4]
    assert resp.get(Attr.ADDRESS_ERROR_CODE) == AddressErrorCode(
        2, 440, "Address Family not Supported"
    )


def test_requested_family_not_available_is_440() -> None:
    server = make_server(public_ip6=None)
    assert error_code(Client(server).allocate(attrs=[(Attr.REQUESTED_ADDRESS_FAMILY, 2)])) == 440
    assert (
        error_code(Client(make_server()).allocate(attrs=[(Attr.REQUESTED_ADDRESS_FAMILY, 7)]))
        == 440
    )


def test_requested_and_additional_family_together_is_400() -> None:
    c = Client(make_server())
    resp = c.allocate(
        attrs=[(Attr.REQUESTED_ADDRESS_FAMILY, 1), (Attr.ADDITIONAL_ADDRESS_FAMILY, 2)]
    )
    assert error_code(resp) == 400
    assert (
        error_code(Client(make_server()).allocate(attrs=[(Attr.ADDITIONAL_ADDRESS_FAMILY, 1)]))
        == 400
    )


def test_allocate_transport_checks() -> None:
    c = Client(make_server())
    assert error_code(c.request(Method.ALLOCATE, [])) == 400
    resp = c.request(Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, 6)])
    assert error_code(resp) == 442
    assert verify_integrity(resp, c.key)  # errors after authentication are signed


def test_second_allocate_on_same_five_tuple_is_437_but_retransmission_is_replayed() -> None:
    server = make_server()
    c = Client(server)
    first_tid = c.tid()
    c.request(Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, 17)], tid=first_tid)
    first = next(cmd for cmd in c.commands if isinstance(cmd, SendToClient)).data
    c.send_raw(
        c.build(Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, 17)], tid=first_tid).encode(key=c.key),
        NOW0 + 1,
    )
    assert [cmd.data for cmd in c.commands] == [first]
    assert error_code(c.allocate(NOW0 + 2)) == 437
    assert server.allocation_count == 1


@pytest.mark.parametrize(
    ("requested", "granted"), [(None, 600), (10, 600), (1200, 1200), (7200, 3600)]
)
def test_allocation_lifetime_is_clamped(requested: int | None, granted: int) -> None:
    c = Client(make_server())
    attrs = [] if requested is None else [(Attr.LIFETIME, requested)]
    assert c.allocate(attrs=attrs).get(Attr.LIFETIME) == granted


# -- Refresh and expiry --------------------------------------------------------------------------


def test_allocation_expires_and_frees_its_port() -> None:
    server = make_server()
    c = Client(server)
    _, port = c.relayed(c.allocate())
    assert server.poll_timeout() == NOW0 + 600
    server.handle_timeout(NOW0 + 599.9)
    assert drain(server) == [] and server.allocation_count == 1
    server.handle_timeout(NOW0 + 600)
    assert drain(server) == [FreeAllocationPort(port, 4)]
    assert server.allocation_count == 0 and server.stats.allocations == 0
    assert server.stats.allocations_expired == 1
    assert error_code(c.request(Method.REFRESH, [], NOW0 + 601)) == 437


def test_requests_with_integrity_sha256_get_sha256_answers() -> None:
    server = make_server()
    c = Client(server)
    c.send_raw(Message(Method.BINDING, Class.REQUEST, c.tid()).encode(), NOW0)
    c.allocate()  # gets a nonce
    msg = c.build(Method.REFRESH, [(Attr.LIFETIME, 700)])
    c.send_raw(msg.encode(key=c.key, sha256=True), NOW0 + 1)
    resp = c.reply()
    assert resp.cls == Class.SUCCESS and resp.get(Attr.LIFETIME) == 700
    assert Attr.MESSAGE_INTEGRITY_SHA256 in resp and verify_integrity(resp, c.key)
    c.send_raw(c.build(Method.REFRESH, []).encode(key=b"bad" * 6, sha256=True), NOW0 + 2)
    assert error_code(c.reply()) == 401


def test_refresh_extends_the_allocation() -> None:
    server = make_server()
    c = Client(server)
    c.allocate()
    resp = c.request(Method.REFRESH, [(Attr.LIFETIME, 1000)], NOW0 + 500)
    assert resp.cls == Class.SUCCESS and resp.get(Attr.LIFETIME) == 1000
    assert verify_integrity(resp, c.key)
    server.handle_timeout(NOW0 + 600)
    assert server.allocation_count == 1
    server.handle_timeout(NOW0 + 1500)
    assert server.allocation_count == 0


def test_refresh_without_lifetime_uses_default_and_caps_at_max() -> None:
    c = Client(make_server())
    c.allocate()
    assert c.request(Method.REFRESH, [], NOW0 + 1).get(Attr.LIFETIME) == 600
    assert c.request(Method.REFRESH, [(Attr.LIFETIME, 99999)], NOW0 + 2).get(Attr.LIFETIME) == 3600


def test_refresh_lifetime_zero_deletes() -> None:
    server = make_server()
    c = Client(server)
    _, port = c.relayed(c.allocate(attrs=[(Attr.ADDITIONAL_ADDRESS_FAMILY, 2)]))
    resp = c.request(Method.REFRESH, [(Attr.LIFETIME, 0)], NOW0 + 5)
    assert resp.cls == Class.SUCCESS and resp.get(Attr.LIFETIME) == 0
    frees = [cmd for cmd in c.commands if isinstance(cmd, FreeAllocationPort)]
    assert {f.family for f in frees} == {4, 6} and FreeAllocationPort(port, 4) in frees
    assert server.allocation_count == 0
    # The port is free for a new allocation, and the client may allocate again.
    assert c.allocate(NOW0 + 6).cls == Class.SUCCESS


def test_refresh_without_allocation_is_437() -> None:
    assert error_code(Client(make_server()).request(Method.REFRESH, [])) == 437


def test_refresh_with_family_the_allocation_lacks_is_443() -> None:
    c = Client(make_server())
    c.allocate()
    assert (
        error_code(c.request(Method.REFRESH, [(Attr.REQUESTED_ADDRESS_FAMILY, 2)], NOW0 + 1)) == 443
    )


def test_other_credentials_on_existing_allocation_are_441() -> None:
    server = make_server()
    c = Client(server)
    c.allocate()
    other = Client(server, public_key="b3RoZXIta2V5")
    for method, attrs in [
        (Method.REFRESH, []),
        (Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, PEER)]),
        (Method.CHANNEL_BIND, [(Attr.CHANNEL_NUMBER, 0x4000), (Attr.XOR_PEER_ADDRESS, PEER)]),
    ]:
        assert error_code(other.request(method, attrs, NOW0 + 1)) == 441
    assert server.allocation_count == 1


# -- authentication failures ---------------------------------------------------------------------


def test_wrong_password_is_401_and_counted() -> None:
    server = make_server()
    c = Client(server)
    c.password = "not-the-password"
    resp = c.allocate()
    assert error_code(resp) == 401 and resp.get(Attr.NONCE) and resp.get(Attr.REALM) == "firezone"
    assert Attr.MESSAGE_INTEGRITY not in resp
    assert server.stats.auth_failures == 1 and server.stats.drops["auth_bad_integrity"] == 1
    assert server.allocation_count == 0


def test_credentials_from_another_secret_are_401() -> None:
    server = make_server()
    c = Client(server, secret=b"\xff" * 32)
    assert error_code(c.allocate()) == 401


def test_expired_username_is_401() -> None:
    server = make_server()
    c = Client(server, expires=int(UNIX0) + 60)
    assert c.allocate().cls == Class.SUCCESS
    later = NOW0 + 61
    resp = c.request(Method.REFRESH, [], later)
    assert error_code(resp) == 401
    assert server.stats.drops["auth_expired_username"] == 1


def test_wrong_realm_and_malformed_username_are_401() -> None:
    server = make_server()
    c = Client(server)
    c.realm = "elsewhere"
    assert error_code(c.allocate()) == 401
    c2 = Client(server, ("198.51.100.8", 1))
    c2.username = "not-a-firezone-username"
    assert error_code(c2.allocate()) == 401
    assert (
        server.stats.drops["auth_wrong_realm"] == 1
        and server.stats.drops["auth_malformed_username"] == 1
    )


def test_integrity_without_username_is_400() -> None:
    c = Client(make_server())
    msg = Message(Method.ALLOCATE, Class.REQUEST, c.tid()).add(Attr.REQUESTED_TRANSPORT, 17)
    c.send_raw(msg.encode(key=c.key), NOW0)
    assert error_code(c.reply()) == 400


def test_stale_nonce_is_438_with_a_fresh_nonce() -> None:
    server = make_server()
    c = Client(server)
    c.allocate()
    old = c.nonce
    resp = c.request(Method.REFRESH, [], NOW0 + NONCE_LIFETIME + 1, retry_stale=False)
    assert error_code(resp) == 438
    assert resp.get(Attr.NONCE) != old and resp.get(Attr.REALM) == "firezone"
    assert server.stats.stale_nonces == 1
    c.nonce = resp.get(Attr.NONCE)
    assert c.request(Method.REFRESH, [], NOW0 + NONCE_LIFETIME + 2).cls == Class.SUCCESS


def test_forged_or_foreign_nonce_is_438() -> None:
    server = make_server()
    c = Client(server)
    transport = [(Attr.REQUESTED_TRANSPORT, 17)]
    c.nonce = "ffffffffff.000000000000000000000000"
    assert error_code(c.request(Method.ALLOCATE, transport, retry_stale=False)) == 438
    c.nonce = "garbage"
    assert error_code(c.request(Method.ALLOCATE, transport, retry_stale=False)) == 438
    # A nonce issued to another client IP is not accepted either.
    other = Client(server, ("198.51.100.99", 1234))
    other.allocate()
    c.nonce = other.nonce
    assert error_code(c.request(Method.ALLOCATE, transport, retry_stale=False)) == 438
    assert server.stats.stale_nonces == 3
    assert c.allocate().cls == Class.SUCCESS  # with the fresh nonce from the 438


def test_replayed_allocate_after_refresh_zero_is_answered_437_not_reallocated() -> None:
    server = make_server()
    c = Client(server)
    c.allocate()
    replay = c.build(Method.REFRESH, [(Attr.LIFETIME, 1000)]).encode(key=c.key)
    c.request(Method.REFRESH, [(Attr.LIFETIME, 0)], NOW0 + 1)
    c.send_raw(replay, NOW0 + 2)
    assert error_code(c.reply()) == 437
    assert server.allocation_count == 0


def test_replayed_request_with_expired_nonce_is_438() -> None:
    server = make_server()
    c = Client(server)
    c.allocate()
    replay = c.build(Method.REFRESH, []).encode(key=c.key)
    c.send_raw(replay, NOW0 + NONCE_LIFETIME + 5)
    assert error_code(c.reply()) == 438


def test_update_secret_keeps_previous_credentials_valid() -> None:
    server = make_server()
    old = Client(server)
    server.update_secret(b"\x42" * 32)
    assert old.allocate().cls == Class.SUCCESS
    new = Client(server, ("198.51.100.8", 2), secret=b"\x42" * 32)
    assert new.allocate().cls == Class.SUCCESS
    server.update_secret(b"\x43" * 32)
    gone = Client(server, ("198.51.100.9", 3))
    assert error_code(gone.allocate()) == 401


# -- 420, quota, capacity ------------------------------------------------------------------------


def test_unknown_comprehension_required_attribute_is_420() -> None:
    c = Client(make_server())
    resp = c.allocate(attrs=[(Attr.DONT_FRAGMENT, b""), (0xC0DE, b"optional is fine")])
    assert error_code(resp) == 420
    assert resp.get(Attr.UNKNOWN_ATTRIBUTES) == (Attr.DONT_FRAGMENT,)
    assert verify_integrity(resp, c.key)


def test_binding_with_unknown_required_attribute_is_420() -> None:
    c = Client(make_server())
    c.send_raw(Message(Method.BINDING, Class.REQUEST, c.tid()).add(0x0777, b"x").encode(), NOW0)
    resp = c.reply()
    assert error_code(resp) == 420 and resp.get(Attr.UNKNOWN_ATTRIBUTES) == (0x0777,)


def test_unknown_method_is_400() -> None:
    c = Client(make_server())
    c.send_raw(Message(0x0B0, Class.REQUEST, c.tid()).encode(), NOW0)
    assert error_code(c.reply()) == 400


def test_quota_per_username_is_486() -> None:
    server = make_server(max_allocations_per_username=2)
    clients = [Client(server, ("198.51.100.7", 1000 + i)) for i in range(3)]
    assert clients[0].allocate().cls == Class.SUCCESS
    assert clients[1].allocate().cls == Class.SUCCESS
    assert error_code(clients[2].allocate()) == 486
    # another user is not affected
    assert (
        Client(server, ("198.51.100.7", 2000), public_key="b3RoZXI=").allocate().cls
        == Class.SUCCESS
    )
    clients[0].request(Method.REFRESH, [(Attr.LIFETIME, 0)], NOW0 + 1)
    assert clients[2].allocate(NOW0 + 2).cls == Class.SUCCESS


def test_even_port_without_r_bit_gives_an_even_port() -> None:
    server = make_server(relay_ports=(50001, 50010))
    for i in range(5):
        c = Client(server, ("198.51.100.7", 1000 + i), public_key=f"key{i}")
        resp = c.allocate(attrs=[(Attr.EVEN_PORT, False)])
        assert c.relayed(resp)[1] % 2 == 0
        assert Attr.RESERVATION_TOKEN not in resp
    c = Client(server, ("198.51.100.7", 2000), public_key="key9")
    assert error_code(c.allocate(attrs=[(Attr.EVEN_PORT, False)])) == 508
    assert c.relayed(c.allocate())[1] % 2 == 1


def test_even_port_r_bit_reserves_the_next_port_for_a_token() -> None:
    server = make_server()
    rtp = Client(server, ("198.51.100.7", 1000))
    resp = rtp.allocate(attrs=[(Attr.EVEN_PORT, True)])
    port = rtp.relayed(resp)[1]
    token = resp.get(Attr.RESERVATION_TOKEN)
    assert port % 2 == 0 and len(token) == 8
    rtcp = Client(server, ("198.51.100.7", 1001))
    resp2 = rtcp.allocate(NOW0 + 10, attrs=[(Attr.RESERVATION_TOKEN, token)])
    assert rtcp.relayed(resp2) == (PUB4, port + 1)
    # a token is single-use
    again = Client(server, ("198.51.100.7", 1002))
    assert error_code(again.allocate(NOW0 + 11, attrs=[(Attr.RESERVATION_TOKEN, token)])) == 508


def test_reservation_expires_after_30s_and_frees_the_port() -> None:
    server = make_server(relay_ports=(50000, 50001))
    c = Client(server, ("198.51.100.7", 1000))
    token = c.allocate(attrs=[(Attr.EVEN_PORT, True)]).get(Attr.RESERVATION_TOKEN)
    other = Client(server, ("198.51.100.7", 1001), public_key="b3RoZXI=")
    assert error_code(other.allocate(NOW0 + 1)) == 508  # 50001 is reserved
    server.handle_timeout(NOW0 + 30)
    assert other.relayed(other.allocate(NOW0 + 31)) == (PUB4, 50001)
    late = Client(server, ("198.51.100.7", 1002))
    assert error_code(late.allocate(NOW0 + 32, attrs=[(Attr.RESERVATION_TOKEN, token)])) == 508


def test_reservation_token_with_even_port_or_family_is_400() -> None:
    server = make_server()
    for attrs in (
        [(Attr.RESERVATION_TOKEN, b"12345678"), (Attr.EVEN_PORT, False)],
        [(Attr.RESERVATION_TOKEN, b"12345678"), (Attr.REQUESTED_ADDRESS_FAMILY, 1)],
    ):
        assert error_code(Client(server).allocate(attrs=attrs)) == 400


def test_out_of_ports_is_508() -> None:
    server = make_server(relay_ports=(50000, 50001))
    ports = set()
    for i in range(2):
        c = Client(server, ("198.51.100.7", 1000 + i), public_key=f"key{i}")
        ports.add(c.relayed(c.allocate())[1])
    assert ports == {50000, 50001}
    assert error_code(Client(server, ("198.51.100.7", 3000), public_key="key9").allocate()) == 508


def test_port_unavailable_turns_pending_success_into_508() -> None:
    server = make_server()
    c = Client(server)
    c.send_raw(Message(Method.ALLOCATE, Class.REQUEST, c.tid()).encode(), NOW0)
    c.nonce = c.reply().get(Attr.NONCE)
    server.handle_client_datagram(
        c.build(Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, 17)]).encode(key=c.key), CLIENT, NOW0
    )
    create = server.poll_command()
    assert isinstance(create, CreateAllocationPort)
    server.port_unavailable(create.port, create.family, NOW0)
    rest = drain(server)
    sent = [parse_message(cmd.data) for cmd in rest if isinstance(cmd, SendToClient)]
    assert [error_code(m) for m in sent] == [508]
    assert FreeAllocationPort(create.port, 4) in rest
    assert server.allocation_count == 0


# -- permissions ---------------------------------------------------------------------------------


def allocated(**kw: object) -> tuple[Client, int]:
    server = make_server(**kw)
    c = Client(server)
    _, port = c.relayed(c.allocate())
    return c, port


def test_peer_data_needs_a_permission() -> None:
    c, port = allocated()
    server = c.server
    server.handle_peer_datagram(b"hi", PEER, port, 4, NOW0)
    assert drain(server) == []
    assert server.stats.drops["peer_without_permission"] == 1
    assert c.request(Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, PEER)]).cls == Class.SUCCESS
    # Any port of the permitted IP may send (permissions are per IP, RFC 8656 §9).
    server.handle_peer_datagram(b"hi", (PEER[0], 9999), port, 4, NOW0 + 1)
    (cmd,) = drain(server)
    assert isinstance(cmd, SendToClient) and cmd.client == CLIENT
    ind = parse_message(cmd.data)
    assert (ind.method, ind.cls) == (Method.DATA, Class.INDICATION)
    assert ind.get(Attr.XOR_PEER_ADDRESS) == (PEER[0], 9999) and ind.get(Attr.DATA) == b"hi"


def test_permission_expires_after_300s_unless_refreshed() -> None:
    c, port = allocated()
    server = c.server
    c.request(Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, PEER)])
    assert server.stats.permissions == 1
    c.request(Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, PEER)], NOW0 + 200)
    server.handle_timeout(NOW0 + 300)
    server.handle_peer_datagram(b"x", PEER, port, 4, NOW0 + 300)
    assert len(drain(server)) == 1
    server.handle_timeout(NOW0 + 500)
    assert server.stats.permissions == 0
    server.handle_peer_datagram(b"x", PEER, port, 4, NOW0 + 500)
    assert drain(server) == []


def test_create_permission_needs_a_peer_address() -> None:
    c, _ = allocated()
    assert error_code(c.request(Method.CREATE_PERMISSION, [])) == 400


def test_create_permission_family_mismatch_is_443() -> None:
    c, _ = allocated()
    assert error_code(c.request(Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, PEER6)])) == 443


def test_create_permission_without_allocation_is_437() -> None:
    c = Client(make_server())
    assert error_code(c.request(Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, PEER)])) == 437


@pytest.mark.parametrize(
    "ip",
    ["127.0.0.1", "127.5.5.5", "0.0.0.0", "169.254.1.1", "224.0.0.1", "255.255.255.255", PUB4],
)
def test_forbidden_ipv4_peers_are_403(ip: str) -> None:
    c, _ = allocated()
    resp = c.request(Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, (ip, 80))])
    assert error_code(resp) == 403
    assert (
        error_code(
            c.request(
                Method.CHANNEL_BIND,
                [(Attr.CHANNEL_NUMBER, 0x4000), (Attr.XOR_PEER_ADDRESS, (ip, 80))],
            )
        )
        == 403
    )


@pytest.mark.parametrize("ip", ["::1", "::", "fe80::1", "::ffff:127.0.0.1", PUB6])
def test_forbidden_ipv6_peers_are_403(ip: str) -> None:
    server = make_server()
    c = Client(server)
    c.allocate(attrs=[(Attr.REQUESTED_ADDRESS_FAMILY, 2)])
    assert (
        error_code(c.request(Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, (ip, 80))])) == 403
    )


def test_one_forbidden_peer_rejects_the_whole_create_permission() -> None:
    c, port = allocated()
    resp = c.request(
        Method.CREATE_PERMISSION,
        [(Attr.XOR_PEER_ADDRESS, PEER), (Attr.XOR_PEER_ADDRESS, ("127.0.0.1", 1))],
    )
    assert error_code(resp) == 403
    c.server.handle_peer_datagram(b"x", PEER, port, 4, NOW0)
    assert drain(c.server) == []


def test_allow_loopback_peers_option() -> None:
    c, _port = allocated(public_ip4="127.0.0.1", allow_loopback_peers=True)
    assert (
        c.request(Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, ("127.0.0.1", 7))]).cls
        == Class.SUCCESS
    )
    # unspecified and link-local stay forbidden
    assert (
        error_code(c.request(Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, ("0.0.0.0", 7))]))
        == 403
    )


# -- Send indications ----------------------------------------------------------------------------


def send_indication(c: Client, peer: tuple[str, int], data: bytes | None) -> bytes:
    msg = Message(Method.SEND, Class.INDICATION, c.tid()).add(Attr.XOR_PEER_ADDRESS, peer)
    if data is not None:
        msg.add(Attr.DATA, data)
    return msg.encode()


def test_send_indication_goes_to_permitted_peer_only() -> None:
    c, port = allocated()
    assert c.send_raw(send_indication(c, PEER, b"payload"), NOW0) == []
    assert c.server.stats.drops["no_permission"] == 1
    c.request(Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, PEER)])
    assert c.send_raw(send_indication(c, PEER, b"payload"), NOW0) == [
        SendToPeer(b"payload", PEER, port, 4)
    ]
    assert c.send_raw(send_indication(c, PEER, None), NOW0) == []
    assert c.server.stats.drops["send_incomplete"] == 1
    assert c.server.stats.packets_client_to_peer == 1 and c.server.stats.bytes_client_to_peer == 7


def test_send_indication_without_allocation_is_dropped() -> None:
    c = Client(make_server())
    assert c.send_raw(send_indication(c, PEER, b"x"), NOW0) == []
    assert c.server.stats.drops["send_without_allocation"] == 1


# -- channels ------------------------------------------------------------------------------------


def bind(c: Client, number: int, peer: tuple[str, int], now: float = NOW0) -> Message:
    return c.request(
        Method.CHANNEL_BIND, [(Attr.CHANNEL_NUMBER, number), (Attr.XOR_PEER_ADDRESS, peer)], now
    )


def test_channel_data_both_ways_fast_and_slow_path() -> None:
    c, port = allocated()
    server = c.server
    assert bind(c, 0x4001, PEER).cls == Class.SUCCESS
    assert server.stats.channels == 1 and server.stats.permissions == 1
    frame = encode_channel_data(0x4001, b"ping")
    # fast path client -> peer
    assert server.relay_channel_data(frame, CLIENT) == (b"ping", PEER, port)
    assert server.relay_channel_data(frame, CLIENT, NOW0 + 1) == (b"ping", PEER, port)
    # slow path gives the same
    assert c.send_raw(frame, NOW0) == [SendToPeer(b"ping", PEER, port, 4)]
    # fast path peer -> client
    assert server.relay_peer_data(b"pong", PEER, port) == (b"\x40\x01\x00\x04pong", CLIENT)
    server.handle_peer_datagram(b"pong", PEER, port, 4, NOW0)
    assert drain(server) == [SendToClient(b"\x40\x01\x00\x04pong", CLIENT)]
    # another port of the same peer IP has a permission but no channel: Data indication
    assert server.relay_peer_data(b"pong", (PEER[0], 1), port) is None
    assert server.stats.packets_client_to_peer == 3 and server.stats.packets_peer_to_client == 2
    assert server.stats.bytes_peer_to_client == 8


def test_channel_data_ipv6() -> None:
    server = make_server()
    c = Client(server, CLIENT6)
    _, port = c.relayed(c.allocate(attrs=[(Attr.REQUESTED_ADDRESS_FAMILY, 2)]))
    bind(c, 0x4FFF, PEER6)
    assert server.relay_channel_data(encode_channel_data(0x4FFF, b"six"), CLIENT6) == (
        b"six",
        PEER6,
        port,
    )
    assert server.relay_peer_data(b"x", PEER6, port) == (b"\x4f\xff\x00\x01x", CLIENT6)
    assert c.send_raw(encode_channel_data(0x4FFF, b"six"), NOW0) == [
        SendToPeer(b"six", PEER6, port, 6)
    ]


@pytest.mark.parametrize("number", [0x0000, 0x3FFF, 0x8000, 0xFFFF])
def test_channel_number_out_of_range_is_400(number: int) -> None:
    c, _ = allocated()
    assert error_code(bind(c, number, PEER)) == 400


@pytest.mark.parametrize("number", [0x4000, 0x4FFF, 0x5F84, 0x7FFF])
def test_rfc5766_channel_numbers_are_accepted(number: int) -> None:
    # coturn's turnutils_uclient binds numbers above 0x4FFF (the RFC 5766 range)
    c, port = allocated()
    assert bind(c, number, PEER).cls == Class.SUCCESS
    frame = encode_channel_data(number, b"x")
    assert c.server.relay_channel_data(frame, CLIENT) == (b"x", PEER, port)


def test_channel_bind_missing_attributes_is_400() -> None:
    c, _ = allocated()
    assert error_code(c.request(Method.CHANNEL_BIND, [(Attr.CHANNEL_NUMBER, 0x4000)])) == 400
    assert error_code(c.request(Method.CHANNEL_BIND, [(Attr.XOR_PEER_ADDRESS, PEER)])) == 400


def test_channel_and_peer_are_bound_one_to_one() -> None:
    c, _ = allocated()
    bind(c, 0x4000, PEER)
    assert error_code(bind(c, 0x4000, ("192.0.2.11", 5000))) == 400
    assert error_code(bind(c, 0x4002, PEER)) == 400
    assert bind(c, 0x4000, PEER, NOW0 + 10).cls == Class.SUCCESS  # refresh


def test_channel_data_length_checks() -> None:
    c, port = allocated()
    server = c.server
    bind(c, 0x4001, PEER)
    for bad in (b"\x40\x01\x00\x05four", b"\x40\x01\x00\x01abcde", b"\x40\x01", b"\x40"):
        assert server.relay_channel_data(bad, CLIENT) is None
        assert c.send_raw(bad, NOW0) == []
    assert server.stats.drops["malformed_channel_data"] == 4
    padded = b"\x40\x01\x00\x01a\x00\x00\x00"
    assert server.relay_channel_data(padded, CLIENT) == (b"a", PEER, port)


def test_channel_data_on_unbound_channel_or_without_allocation_is_dropped() -> None:
    c, _ = allocated()
    assert c.send_raw(encode_channel_data(0x4444, b"x"), NOW0) == []
    other = Client(c.server, ("198.51.100.50", 1))
    assert other.send_raw(encode_channel_data(0x4444, b"x"), NOW0) == []
    assert c.server.stats.drops["unbound_channel"] == 1
    assert c.server.stats.drops["channel_data_without_allocation"] == 1


def test_channel_expiry_cooldown_and_rebind() -> None:
    c, port = allocated()
    server = c.server
    c.request(Method.REFRESH, [(Attr.LIFETIME, 3600)])
    bind(c, 0x4001, PEER)
    frame = encode_channel_data(0x4001, b"x")
    # keep the permission alive so only the channel expires
    for t in (250, 500, 650):
        c.request(Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, PEER)], NOW0 + t)
        server.handle_timeout(NOW0 + t)
    assert server.relay_channel_data(frame, CLIENT) is None  # expired at +600
    assert server.stats.channels == 0
    assert c.send_raw(frame, NOW0 + 700) == []
    assert server.stats.drops.get("channel_expired") == 1, server.stats.drops
    # in cooldown the number and the peer stay reserved for each other
    assert error_code(bind(c, 0x4001, ("192.0.2.11", 1), NOW0 + 800)) == 400
    assert error_code(bind(c, 0x4002, PEER, NOW0 + 800)) == 400
    # rebinding the same pair revives the channel
    assert bind(c, 0x4001, PEER, NOW0 + 850).cls == Class.SUCCESS
    assert server.relay_channel_data(frame, CLIENT) == (b"x", PEER, port)
    # let it expire (1450) and pass the cooldown (1750): the number is free for another peer
    for t in (1100, 1350, 1600, 1760):
        c.request(Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, PEER)], NOW0 + t)
        server.handle_timeout(NOW0 + t)
    assert bind(c, 0x4001, ("192.0.2.11", 1), NOW0 + 1800).cls == Class.SUCCESS


def test_permission_expiry_stops_an_active_channel() -> None:
    c, port = allocated()
    server = c.server
    bind(c, 0x4001, PEER)
    frame = encode_channel_data(0x4001, b"x")
    server.handle_timeout(NOW0 + 300)  # permission (300 s) ends before the channel (600 s)
    assert server.relay_channel_data(frame, CLIENT) is None
    assert server.relay_peer_data(b"x", PEER, port) is None
    assert c.send_raw(frame, NOW0 + 301) == []
    c.request(Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, PEER)], NOW0 + 310)
    assert server.relay_channel_data(frame, CLIENT) == (b"x", PEER, port)


def test_fast_path_with_now_checks_expiry_without_a_timer() -> None:
    c, port = allocated()
    bind(c, 0x4001, PEER)
    frame = encode_channel_data(0x4001, b"x")
    assert c.server.relay_channel_data(frame, CLIENT, NOW0 + 299) is not None
    assert c.server.relay_channel_data(frame, CLIENT, NOW0 + 300) is None
    assert c.server.relay_peer_data(b"x", PEER, port, NOW0 + 300) is None


def test_allocation_deletion_removes_channels_from_fast_path() -> None:
    c, port = allocated()
    server = c.server
    bind(c, 0x4001, PEER)
    c.request(Method.REFRESH, [(Attr.LIFETIME, 0)], NOW0 + 1)
    assert server.relay_channel_data(encode_channel_data(0x4001, b"x"), CLIENT) is None
    assert server.relay_peer_data(b"x", PEER, port) is None
    assert server.stats.channels == 0 and server.stats.permissions == 0
    server.handle_peer_datagram(b"x", PEER, port, 4, NOW0 + 2)
    assert server.stats.drops["peer_data_without_allocation"] == 1


def test_poll_timeout_reports_now_while_commands_are_queued() -> None:
    server = make_server()
    server.handle_client_datagram(
        Message(Method.BINDING, Class.REQUEST, b"x" * 12).encode(), CLIENT, NOW0 + 3
    )
    assert server.poll_timeout() == NOW0 + 3
    drain(server)
    assert server.poll_timeout() is None
