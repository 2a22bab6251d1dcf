"""TURN client Allocation against the pure TurnServer, wired in memory (virtual time)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firezone.proto.rng import SeededRng
from firezone.proto.stun import Attr, Class, Message, Method, parse_message
from firezone.proto.turn import SendToClient, SendToPeer, TurnServer, make_credentials
from firezone.proto.turn.client import (
    CHANNEL_FIRST,
    Allocation,
    AllocationFailed,
    AllocationLost,
    AllocationReady,
    AllocationState,
)

SERVER = ("203.0.113.101", 3478)
CLIENT = ("198.51.100.5", 4000)
PEER = ("192.0.2.7", 5000)
SECRET = b"\x01" * 32
UNIX0 = 1_800_000_000


def make_server(now=0.0, secret=SECRET, seed=9):
    return TurnServer(
        secret=secret,
        public_ip4=SERVER[0],
        public_ip6=None,
        rng=SeededRng(seed),
        now=now,
        unix_time=UNIX0,
    )


class Link:
    """Client allocation <-> server, zero latency; records what went where."""

    def __init__(self, alloc: Allocation, server: TurnServer) -> None:
        self.alloc, self.server = alloc, server
        self.now = 0.0
        self.up = True
        self.to_server: list[tuple[float, bytes]] = []
        self.to_peer: list[tuple[tuple[str, int], int, bytes]] = []
        self.events: list = []

    def pump(self) -> None:
        for _ in range(100):
            moved = False
            while (t := self.alloc.poll_transmit()) is not None:
                moved = True
                assert t.dst == SERVER
                self.to_server.append((self.now, t.payload))
                if self.up:
                    self.server.handle_client_datagram(t.payload, CLIENT, self.now)
            while (c := self.server.poll_command()) is not None:
                moved = True
                if isinstance(c, SendToClient) and self.up:
                    self.alloc.handle_input(c.data, SERVER, self.now)
                elif isinstance(c, SendToPeer):
                    self.to_peer.append((c.peer, c.relay_port, c.data))
            while (e := self.alloc.poll_event()) is not None:
                self.events.append((self.now, e))
            if not moved:
                return

    def advance(self, until: float) -> None:
        self.pump()
        while True:
            ds = [
                d for d in (self.alloc.poll_timeout(), self.server.poll_timeout()) if d is not None
            ]
            nxt = min(ds, default=None)
            if nxt is None or nxt > until:
                self.now = until
                return
            self.now = max(self.now, nxt)
            self.alloc.handle_timeout(self.now)
            self.server.handle_timeout(self.now)
            self.pump()

    def of(self, cls):
        return [e for _, e in self.events if isinstance(e, cls)]


def creds(secret=SECRET, key="client-key", expires=UNIX0 + 86400):
    return make_credentials(secret, key, expires)


def new_link(**kw):
    user, pwd = creds()
    alloc = Allocation(
        server=SERVER, username=user, password=pwd, rng=SeededRng(3), now=0.0, local=CLIENT, **kw
    )
    link = Link(alloc, make_server())
    link.pump()
    return link


def methods(link, since=0.0):
    out = []
    for t, data in link.to_server:
        if t >= since and data[0] < 0x40:
            m = parse_message(data)
            out.append((Method(m.method).name, Attr.USERNAME in m))
    return out


def test_allocate_answers_the_401_challenge_and_becomes_ready():
    link = new_link()
    ready = link.of(AllocationReady)
    assert len(ready) == 1
    assert ready[0].srflx == CLIENT
    (relayed,) = ready[0].relayed_addrs
    assert relayed[0] == SERVER[0] and 49152 <= relayed[1] <= 65535
    assert ready[0].lifetime == 600
    assert methods(link) == [("ALLOCATE", False), ("ALLOCATE", True)]
    assert link.alloc.state == AllocationState.READY


def test_refreshes_before_expiry_and_survives_an_hour():
    link = new_link()
    link.advance(3600)
    assert link.server.allocation_count == 1
    assert link.alloc.state == AllocationState.READY
    refreshes = [
        t
        for t, data in link.to_server
        if data[0] < 0x40 and parse_message(data).method == Method.REFRESH
    ]
    assert refreshes and refreshes[0] == pytest.approx(300)
    assert not link.of(AllocationLost)


def test_binding_keepalive_every_25s():
    link = new_link()
    link.advance(80)
    binds = [
        t for t, d in link.to_server if d[0] < 0x40 and parse_message(d).method == Method.BINDING
    ]
    assert binds == [pytest.approx(25), pytest.approx(50), pytest.approx(75)]


def test_encode_to_peer_binds_a_channel_then_flushes_queued_payloads():
    link = new_link()
    assert link.alloc.encode_to_peer(PEER, b"early-1", link.now) is None
    assert link.alloc.encode_to_peer(PEER, b"early-2", link.now) is None
    link.pump()
    assert link.alloc.channel_for(PEER) == CHANNEL_FIRST
    assert [(p, d) for p, _, d in link.to_peer] == [(PEER, b"early-1"), (PEER, b"early-2")]
    data = link.alloc.encode_to_peer(PEER, b"now")
    assert data == CHANNEL_FIRST.to_bytes(2, "big") + (3).to_bytes(2, "big") + b"now"


def test_each_peer_gets_its_own_channel_number():
    link = new_link()
    peers = [("192.0.2.7", 5000 + i) for i in range(3)]
    nums = [link.alloc.bind_channel(p, link.now) for p in peers]
    assert nums == [0x4000, 0x4001, 0x4002]
    link.pump()
    assert [link.alloc.channel_for(p) for p in peers] == nums


def test_peer_data_comes_back_as_channel_data_and_decapsulates():
    link = new_link()
    link.alloc.bind_channel(PEER, link.now)
    link.pump()
    relay_port = link.alloc.relayed_addrs[0][1]
    fast = link.server.relay_peer_data(b"pong", PEER, relay_port, link.now)
    assert fast is not None
    datagram, client = fast
    assert client == CLIENT
    peer, payload = link.alloc.decapsulate(datagram, SERVER)
    assert (peer, bytes(payload)) == (PEER, b"pong")
    assert link.alloc.handle_input(datagram, SERVER, link.now) is True
    assert link.alloc.poll_peer_data() == (PEER, b"pong")


def test_data_indication_from_a_permitted_peer_without_channel():
    link = new_link()
    link.alloc.create_permission(PEER, link.now)
    link.pump()
    relay_port = link.alloc.relayed_addrs[0][1]
    link.server.handle_peer_datagram(b"hi", PEER, relay_port, 4, link.now)
    link.pump()
    assert link.alloc.poll_peer_data() == (PEER, b"hi")


def test_channel_is_rebound_before_its_permission_lapses():
    link = new_link()
    link.alloc.bind_channel(PEER, link.now)
    link.advance(1800)
    binds = [
        t
        for t, d in link.to_server
        if d[0] < 0x40 and parse_message(d).method == Method.CHANNEL_BIND
    ]
    assert binds[:3] == [0.0, pytest.approx(270), pytest.approx(540)]
    relay_port = link.alloc.relayed_addrs[0][1]
    assert link.server.relay_peer_data(b"x", PEER, relay_port, link.now) is not None


def test_no_answer_retries_every_second_and_fails_after_8s():
    user, pwd = creds()
    alloc = Allocation(
        server=SERVER, username=user, password=pwd, rng=SeededRng(3), now=0.0, local=CLIENT
    )
    link = Link(alloc, make_server())
    link.up = False
    link.advance(20)
    sends = [t for t, _ in link.to_server]
    assert sends == [float(i) for i in range(8)]
    (failed,) = link.of(AllocationFailed)
    assert failed.reason == "timeout"
    assert alloc.state == AllocationState.FAILED
    assert alloc.poll_timeout() is None


def test_wrong_password_fails_with_401():
    user, _ = creds()
    alloc = Allocation(
        server=SERVER, username=user, password="nope", rng=SeededRng(3), now=0.0, local=CLIENT
    )
    link = Link(alloc, make_server())
    link.pump()
    (failed,) = link.of(AllocationFailed)
    assert failed.code == 401


def test_unreachable_relay_is_detected_by_the_keepalive():
    link = new_link()
    link.advance(10)
    link.up = False
    link.advance(60)
    (lost,) = link.of(AllocationLost)
    assert lost.reason == "relay did not answer"
    assert link.events[-1][0] == pytest.approx(25 + 8)
    assert link.alloc.relayed_addrs == ()


def test_relay_restart_loses_the_allocation_and_new_credentials_allocate_again():
    link = new_link()
    link.advance(100)
    new_secret = b"\x02" * 32
    link.server = make_server(
        now=link.now, secret=new_secret, seed=10
    )  # restarted: no state, new keys
    link.advance(400)  # the refresh at 300 s hits the new relay: stale nonce, then 437
    (lost,) = link.of(AllocationLost)
    assert lost.relayed_addrs
    user, pwd = creds(secret=new_secret)
    link.alloc.update_credentials(user, pwd, link.now)
    link.pump()
    assert len(link.of(AllocationReady)) == 2
    assert link.alloc.state == AllocationState.READY


def test_credential_change_while_ready_reallocates():
    link = new_link()
    first = link.alloc.relayed_addrs
    user, pwd = creds(expires=UNIX0 + 2 * 86400)
    link.alloc.update_credentials(user, pwd, link.now)
    link.pump()
    assert [type(e).__name__ for _, e in link.events] == [
        "AllocationReady",
        "AllocationLost",
        "AllocationReady",
    ]
    assert link.server.allocation_count == 1
    assert link.alloc.relayed_addrs and link.alloc.relayed_addrs != () and first
    link.advance(700)
    assert link.alloc.state == AllocationState.READY


def test_stale_nonce_is_retried_with_the_new_nonce():
    link = new_link()
    link.advance(700)  # the server's nonces last 600 s; the refreshes must cope
    assert link.server.stats.stale_nonces >= 1
    assert link.alloc.state == AllocationState.READY


def test_free_deletes_the_allocation_on_the_relay():
    link = new_link()
    link.alloc.free(link.now)
    link.pump()
    assert link.server.allocation_count == 0
    assert link.alloc.state == AllocationState.FREED
    assert link.alloc.poll_timeout() is None


def test_datagrams_from_elsewhere_are_not_ours():
    link = new_link()
    assert link.alloc.handle_input(b"\x40\x00\x00\x01x", ("203.0.113.9", 3478), link.now) is False


def test_response_with_bad_integrity_is_ignored():
    link = new_link()
    link.alloc.bind_channel(PEER, link.now)
    req = parse_message(link.alloc.poll_transmit().payload)
    assert req.method == Method.CHANNEL_BIND
    fake = Message(
        Method.CHANNEL_BIND, Class.ERROR, req.transaction_id, [(Attr.ERROR_CODE, (437, "x"))]
    )
    assert link.alloc.handle_input(fake.encode(key=b"forged"), SERVER, link.now) is True
    assert link.alloc.state == AllocationState.READY
    assert link.alloc.stats["bad_integrity"] == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_garbage_from_the_relay_never_raises(data):
    link = new_link()
    assert link.alloc.handle_input(data, SERVER, link.now) in (True, False)
    assert link.alloc.decapsulate(data, SERVER) is None or True


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=60), st.sampled_from(list(Method)), st.integers(0, 3))
def test_stun_shaped_garbage_never_raises(tail, method, cls):
    link = new_link()
    raw = bytearray(Message(method, Class(cls), b"q" * 12).encode(fingerprint=False))
    raw[2:4] = len(tail).to_bytes(2, "big")
    assert link.alloc.handle_input(bytes(raw) + tail, SERVER, link.now) in (True, False)


def test_dual_stack_allocation_gets_an_ipv4_and_an_ipv6_relayed_address():
    user, pwd = creds()
    alloc = Allocation(
        server=SERVER,
        username=user,
        password=pwd,
        rng=SeededRng(3),
        now=0.0,
        local=CLIENT,
        ipv6=True,
    )
    server = TurnServer(
        secret=SECRET,
        public_ip4=SERVER[0],
        public_ip6="2001:db8::101",
        rng=SeededRng(9),
        now=0.0,
        unix_time=UNIX0,
    )
    link = Link(alloc, server)
    link.pump()
    (ready,) = link.of(AllocationReady)
    assert sorted(ip for ip, _ in ready.relayed_addrs) == ["2001:db8::101", SERVER[0]]


def test_channel_bind_refused_with_403_is_not_repeated_until_the_backoff_ends():
    from firezone.proto.turn.client import CHANNEL_REFUSED_BACKOFF

    link = new_link()
    loopback = ("127.0.0.1", 5000)  # the relay refuses loopback peers (403)
    assert link.alloc.bind_channel(loopback, link.now) is not None
    link.pump()
    binds = [d for _, d in link.to_server if parse_message(d).method == Method.CHANNEL_BIND]
    assert len(binds) == 1 and link.alloc.channel_for(loopback) is None
    # Packets towards it keep coming: no new ChannelBind, nothing queued.
    for _ in range(5):
        assert link.alloc.encode_to_peer(loopback, b"x", link.now) is None
        link.pump()
    binds = [d for _, d in link.to_server if parse_message(d).method == Method.CHANNEL_BIND]
    assert len(binds) == 1
    assert link.alloc.stats["channel_refused_skipped"] == 5
    # Other peers are unaffected; after the backoff the relay is asked again.
    assert link.alloc.bind_channel(PEER, link.now) is not None
    link.advance(link.now + CHANNEL_REFUSED_BACKOFF + 1)
    assert link.alloc.bind_channel(loopback, link.now) is not None
    link.pump()
    binds = [d for _, d in link.to_server if parse_message(d).method == Method.CHANNEL_BIND]
    assert len(binds) == 3
