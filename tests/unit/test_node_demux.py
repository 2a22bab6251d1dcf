"""Node: demultiplexing by first bytes, routing to connections, and robustness to bad input."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firezone.proto.ice import Candidate
from firezone.proto.node import (
    ConnectionClosed,
    ConnectionEstablished,
    ConnectionFailed,
    NewIceCandidate,
    Node,
    PathChanged,
    RelayInfo,
    _request_ufrag,
)
from firezone.proto.rng import SeededRng
from firezone.proto.stun import Attr, Class, Message, Method, is_stun, parse_message
from firezone.proto.wireguard import Tunnel, generate_private_key, public_key

A, B, C = ("198.51.100.1", 52625), ("198.51.100.2", 52625), ("198.51.100.3", 52625)
RELAY = ("203.0.113.101", 3478)
SOME_KEY = public_key(generate_private_key(SeededRng("some peer")))


def make_node(name: str, addr, *, is_client: bool) -> Node:
    rng = SeededRng(f"unit:{name}")
    node = Node(
        private_key=generate_private_key(rng),
        rng=rng,
        now=0.0,
        unix_time=1_800_000_000.0,
        is_client=is_client,
    )
    node.add_local_interface(addr, 0.0)
    return node


class Wire:
    """Nodes on one loss-free LAN with zero latency: transmits are delivered at once."""

    def __init__(self, nodes: dict) -> None:
        self.nodes = nodes  # addr -> Node
        self.now = 0.0
        self.tun: list[tuple] = []
        self.events: dict = {a: [] for a in nodes}

    def deliver(self, src, dst, payload) -> None:
        node = self.nodes.get(dst)
        if node is None:
            return
        got = node.handle_datagram(dst, src, payload, self.now)
        if got is not None:
            self.tun.append((dst, got[0], got[1]))

    def settle(self, seconds: float = 3.0, step: float = 0.01) -> None:
        end = self.now + seconds
        while self.now < end:
            for addr, node in self.nodes.items():
                node.handle_timeout(self.now)
                while (t := node.poll_transmit()) is not None:
                    assert t.src == addr  # everything leaves from the one socket
                    self.deliver(t.src, t.dst, t.payload)
                while (e := node.poll_event()) is not None:
                    self.events[addr].append(e)
            self.now += step


def pair(client: Node, gateway: Node, cid: str, gid: str, n: int, now: float = 0.0) -> None:
    cu, gu = (f"c{n}", "p" * 22), (f"g{n}", "q" * 22)
    gateway.upsert_connection(
        cid,
        peer_public_key=client.public_key,
        preshared_key=None,
        local_creds=gu,
        remote_creds=cu,
        now=now,
    )
    client.upsert_connection(
        gid,
        peer_public_key=gateway.public_key,
        preshared_key=None,
        local_creds=cu,
        remote_creds=gu,
        now=now,
    )
    for node, peer in ((client, gid), (gateway, cid)):
        other, other_id = (gateway, cid) if node is client else (client, gid)
        for cand in node.local_candidates:
            other.add_remote_candidate(other_id, cand.to_sdp(), now)


def ipv4(seq: int) -> bytes:
    body = struct.pack("!Q", seq) + bytes(24)
    return (
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(body),
            0,
            0,
            64,
            17,
            0,
            b"\x64\x40\0\1",
            b"\x64\x40\0\2",
        )
        + body
    )


@pytest.fixture
def star():
    """One gateway with two clients, connected."""
    gw = make_node("gw", A, is_client=False)
    c1 = make_node("c1", B, is_client=True)
    c2 = make_node("c2", C, is_client=True)
    pair(c1, gw, "c1", "gw", 1)
    pair(c2, gw, "c2", "gw", 2)
    wire = Wire({A: gw, B: c1, C: c2})
    wire.settle()
    assert any(isinstance(e, ConnectionEstablished) for e in wire.events[A])
    return wire, gw, c1, c2


def test_wireguard_transport_is_routed_by_receiver_index(star):
    wire, _, c1, c2 = star
    for node, seq in ((c1, 1), (c2, 2)):
        t = node.encapsulate("gw", ipv4(seq), wire.now)
        assert t is not None and t.dst == A
        wire.deliver(t.src, t.dst, t.payload)
    assert [(peer, struct.unpack_from("!Q", p, 20)[0]) for _, peer, p in wire.tun] == [
        ("c1", 1),
        ("c2", 2),
    ]


def test_established_traffic_creates_no_events(star):
    wire, gw, c1, _ = star
    for i in range(50):
        t = c1.encapsulate("gw", ipv4(i), wire.now)
        wire.deliver(t.src, t.dst, t.payload)
    assert gw.poll_event() is None and c1.poll_event() is None
    assert len(wire.tun) == 50


def test_unknown_wireguard_index_is_dropped_and_counted(star):
    _, gw, _, _ = star
    bogus = struct.pack("<IIQ", 4, 0xFFFFFF00, 0) + bytes(32)
    assert gw.handle_datagram(A, B, bogus, 5.0) is None
    assert gw.stats_counters["wg_unknown_index"] == 1


def test_initiation_from_an_unknown_key_is_dropped(star):
    _, gw, _, _ = star
    rng = SeededRng("stranger")
    stranger = Tunnel(
        static_private=generate_private_key(rng),
        peer_public=gw.public_key,
        preshared_key=None,
        index=1,
        rng=rng,
        now=5.0,
        unix_time=1_800_000_005.0,
    )
    stranger.force_handshake(5.0)
    init = stranger.poll_transmit()
    assert init is not None and init[0] == 1
    assert gw.handle_datagram(A, ("198.51.100.9", 52625), init, 5.0) is None
    assert gw.stats_counters["wg_unknown_peer"] == 1
    assert gw.poll_transmit() is None  # no response to a stranger
    mangled = init[:20] + bytes(20) + init[40:]
    assert gw.handle_datagram(A, ("198.51.100.9", 52625), mangled, 5.0) is None
    assert gw.stats_counters["wg_bad_initiation"] == 1


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff" * 40,  # neither STUN, ChannelData nor WireGuard
        b"\x40\x00\x00\x04abcd",  # ChannelData, but not from a relay
        b"\x04\x00\x00\x01" + bytes(28),  # type 4 without three zero bytes
    ],
    ids=["garbage", "channel-data-not-from-a-relay", "type-4-without-zero-bytes"],
)
def test_unclassifiable_datagrams_are_counted(payload):
    node = make_node("n", A, is_client=False)
    assert node.handle_datagram(A, B, payload, 1.0) is None
    assert node.stats_counters.get("unknown_datagram", 0) == 1


def test_stun_request_for_an_unknown_ufrag_is_dropped():
    node = make_node("n", A, is_client=False)
    m = Message(Method.BINDING, Class.REQUEST, bytes(12))
    m.add(Attr.USERNAME, "nobody:else")
    data = m.encode(key=b"k")
    assert is_stun(data)
    assert _request_ufrag(data) == "nobody"
    assert node.handle_datagram(A, B, data, 1.0) is None
    assert node.stats_counters["stun_unmatched"] == 1


def test_malformed_remote_candidates_are_dropped_not_raised():
    client = make_node("c", B, is_client=True)
    client.upsert_connection(
        "gw",
        peer_public_key=SOME_KEY,
        preshared_key=None,
        local_creds=("a", "p" * 22),
        remote_creds=("b", "q" * 22),
        now=0.0,
    )
    client.add_remote_candidate("gw", "candidate:1 1 tcp 1 1.2.3.4 5 typ host", 0.0)
    client.add_remote_candidate("gw", "garbage", 0.0)
    client.add_remote_candidate("nobody", Candidate.host(A).to_sdp(), 0.0)
    assert client.stats_counters == {"candidate_malformed": 2, "candidate_unknown_peer": 1}


def test_update_relays_allocates_before_any_connection():
    node = make_node("n", B, is_client=True)
    node.update_relays([RelayInfo("r1", RELAY, "1900000000:salt", "pw")], 0.0)
    t = node.poll_transmit()
    assert t is not None and t.src == B and t.dst == RELAY
    assert parse_message(t.payload).method == Method.ALLOCATE
    assert node.poll_transmit() is None
    assert node.poll_timeout() == pytest.approx(1.0)  # the Allocate retransmission


def test_same_credentials_keep_the_connection_new_ones_restart_ice(star):
    wire, gw, c1, _ = star
    before = c1.stats("gw")
    cu, gu = ("c1", "p" * 22), ("g1", "q" * 22)
    c1.upsert_connection(
        "gw",
        peer_public_key=gw.public_key,
        preshared_key=None,
        local_creds=cu,
        remote_creds=gu,
        now=wire.now,
    )
    assert c1.poll_event() is None
    assert c1.stats("gw")["tx_bytes"] == before["tx_bytes"]
    c1.upsert_connection(
        "gw",
        peer_public_key=gw.public_key,
        preshared_key=None,
        local_creds=("c1b", "r" * 22),
        remote_creds=("g1b", "s" * 22),
        now=wire.now,
    )
    ev = c1.poll_event()
    assert isinstance(ev, NewIceCandidate)  # re-signalled for the restarted agent
    assert c1.stats("gw")["wg_established"]  # the tunnel is kept


def test_remove_connection_emits_closed_once():
    client = make_node("c", B, is_client=True)
    client.upsert_connection(
        "gw",
        peer_public_key=SOME_KEY,
        preshared_key=None,
        local_creds=("a", "p" * 22),
        remote_creds=("b", "q" * 22),
        now=0.0,
    )
    while client.poll_event() is not None:
        pass
    client.remove_connection("gw", 1.0)
    client.remove_connection("gw", 1.0)
    assert client.poll_event() == ConnectionClosed("gw")
    assert client.poll_event() is None
    assert client.encapsulate("gw", ipv4(1), 1.0) is None


def test_event_and_relay_values_are_validated():
    with pytest.raises(ValueError):
        ConnectionEstablished("p", "carrier-pigeon", None)
    with pytest.raises(ValueError):
        PathChanged("p", "direct", None)
    with pytest.raises(ValueError):
        RelayInfo("", RELAY, "u", "p")
    with pytest.raises(ValueError):
        RelayInfo("r", RELAY, "", "p")


def _stunlike(body: bytes, first: int, kind: int) -> bytes:
    """A STUN header (Binding request / success, or anything) in front of random attributes."""
    return (
        bytes([first, kind]) + len(body).to_bytes(2, "big") + b"\x21\x12\xa4\x42" + bytes(12) + body
    )


datagrams = st.one_of(
    st.binary(max_size=200),
    st.builds(_stunlike, st.binary(max_size=120), st.sampled_from([0, 1]), st.integers(0, 255)),
    st.builds(lambda b, t: bytes([t, 0, 0, 0]) + b, st.binary(max_size=160), st.integers(1, 4)),
)


@settings(max_examples=300, deadline=None)
@given(datagrams, st.sampled_from([B, C, RELAY]))
def test_random_datagrams_never_raise(data, src):
    node = make_node("fuzz", A, is_client=False)
    node.update_relays([RelayInfo("r1", RELAY, "1900000000:salt", "pw")], 0.0)
    node.upsert_connection(
        "c",
        peer_public_key=SOME_KEY,
        preshared_key=None,
        local_creds=("a", "p" * 22),
        remote_creds=("b", "q" * 22),
        now=0.0,
    )
    assert node.handle_datagram(A, src, data, 1.0) is None
    node.handle_timeout(2.0)


def test_an_invalid_peer_key_fails_the_connection_instead_of_raising():
    node = make_node("n", B, is_client=True)
    node.upsert_connection(
        "gw",
        peer_public_key=bytes(32),
        preshared_key=None,
        local_creds=("a", "p" * 22),
        remote_creds=("b", "q" * 22),
        now=0.0,
    )
    assert node.poll_event() == ConnectionFailed("gw", "invalid peer public key")
    assert node.connections() == []


def test_ipv6_sockets_connect_and_carry_data():
    a6, b6 = ("2001:db8::1", 52625), ("2001:db8::2", 52625)
    gw = make_node("gw6", a6, is_client=False)
    c = make_node("c6", b6, is_client=True)
    pair(c, gw, "c", "gw", 6)
    wire = Wire({a6: gw, b6: c})
    wire.settle()
    assert ConnectionEstablished("gw", "host", c.stats("gw")["rtt"]) in wire.events[b6]
    t = c.encapsulate("gw", ipv4(7), wire.now)
    assert t is not None and t.src == b6 and t.dst == a6
    wire.deliver(t.src, t.dst, t.payload)
    assert [(peer, struct.unpack_from("!Q", p, 20)[0]) for _, peer, p in wire.tun] == [("c", 7)]
