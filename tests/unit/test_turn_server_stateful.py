"""Stateful hypothesis test: TurnServer against a small reference model of RFC 8656 timers.

Rules allocate, refresh, permit, bind channels, advance virtual time (firing every timer the
server asks for, as a driver would) and send data both ways; after every step the fast paths and
the slow paths must agree with the model about what is relayed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from turn_harness import CLIENT, NOW0, Client, error_code, make_server

from firezone.proto.stun import Attr, Class, Method, encode_channel_data, parse_message
from firezone.proto.turn import SendToClient, SendToPeer

PEERS = [("192.0.2.10", 5000), ("192.0.2.10", 5001), ("192.0.2.20", 5000)]
NUMBERS = [0x4000, 0x4001, 0x4002]


@dataclass
class Model:
    alloc_expires: float | None = None
    perms: dict[str, float] = field(default_factory=dict)
    channels: dict[int, tuple[tuple[str, int], float]] = field(default_factory=dict)

    def alive(self, now: float) -> bool:
        return self.alloc_expires is not None and self.alloc_expires > now

    def gc(self, now: float) -> None:
        if self.alloc_expires is not None and self.alloc_expires <= now:
            self.alloc_expires = None
            self.perms.clear()
            self.channels.clear()
        self.channels = {n: (p, e) for n, (p, e) in self.channels.items() if e + 300 > now}

    def channel_ok(self, number: int, now: float) -> tuple[str, int] | None:
        if not self.alive(now) or number not in self.channels:
            return None
        peer, expires = self.channels[number]
        if expires <= now or self.perms.get(peer[0], 0.0) <= now:
            return None
        return peer

    def number_for(self, peer: tuple[str, int], now: float) -> int | None:
        for n, (p, _) in self.channels.items():
            if p == peer and self.channel_ok(n, now) is not None:
                return n
        return None


class TurnMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.server = make_server()
        self.client = Client(self.server)
        self.now = NOW0
        self.model = Model()
        self.port = 0

    # -- control plane -------------------------------------------------------------------------

    @rule()
    def allocate(self) -> None:
        resp = self.client.allocate(self.now)
        if self.model.alive(self.now):
            assert error_code(resp) == 437
        else:
            assert resp.cls == Class.SUCCESS
            self.port = self.client.relayed(resp)[1]
            self.model.alloc_expires = self.now + 600

    @rule(lifetime=st.sampled_from([0, 0, 300, 900, 5000]))
    def refresh(self, lifetime: int) -> None:
        resp = self.client.request(Method.REFRESH, [(Attr.LIFETIME, lifetime)], self.now)
        if not self.model.alive(self.now):
            assert error_code(resp) == 437
        elif lifetime == 0:
            assert resp.cls == Class.SUCCESS
            self.model.alloc_expires = None
            self.model.perms.clear()
            self.model.channels.clear()
        else:
            assert resp.cls == Class.SUCCESS
            self.model.alloc_expires = self.now + min(max(lifetime, 600), 3600)

    @rule(peer=st.sampled_from(PEERS))
    def permit(self, peer: tuple[str, int]) -> None:
        resp = self.client.request(
            Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, peer)], self.now
        )
        if not self.model.alive(self.now):
            assert error_code(resp) == 437
        else:
            assert resp.cls == Class.SUCCESS
            self.model.perms[peer[0]] = self.now + 300

    @rule(number=st.sampled_from(NUMBERS), peer=st.sampled_from(PEERS))
    def bind(self, number: int, peer: tuple[str, int]) -> None:
        attrs = [(Attr.CHANNEL_NUMBER, number), (Attr.XOR_PEER_ADDRESS, peer)]
        resp = self.client.request(Method.CHANNEL_BIND, attrs, self.now)
        m = self.model
        if not m.alive(self.now):
            assert error_code(resp) == 437
            return
        clash = (number in m.channels and m.channels[number][0] != peer) or any(
            p == peer and n != number for n, (p, _) in m.channels.items()
        )
        if clash:
            assert error_code(resp) == 400
            return
        assert resp.cls == Class.SUCCESS
        m.channels[number] = (peer, self.now + 600)
        m.perms[peer[0]] = self.now + 300

    @rule(dt=st.one_of(st.floats(0, 5), st.floats(5, 400)))
    def advance(self, dt: float) -> None:
        target = self.now + dt
        # What a driver does: fire each deadline the server reports, then reach the target.
        while (deadline := self.server.poll_timeout()) is not None and deadline <= target:
            self.server.handle_timeout(deadline)
            _drain(self.server)
            self.model.gc(deadline)
            self.now = max(self.now, deadline)
        self.now = target
        self.server.handle_timeout(target)
        _drain(self.server)
        self.model.gc(target)

    # -- data plane ----------------------------------------------------------------------------

    @rule(number=st.sampled_from(NUMBERS))
    def client_sends(self, number: int) -> None:
        frame = encode_channel_data(number, b"data")
        want = self.model.channel_ok(number, self.now)
        fast = self.server.relay_channel_data(frame, CLIENT)
        self.server.handle_client_datagram(frame, CLIENT, self.now)
        slow = [c for c in _drain(self.server) if isinstance(c, SendToPeer)]
        if want is None:
            assert fast is None and slow == []
        else:
            assert fast == (b"data", want, self.port)
            assert slow == [SendToPeer(b"data", want, self.port, 4)]

    @rule(peer=st.sampled_from(PEERS))
    def peer_sends(self, peer: tuple[str, int]) -> None:
        m = self.model
        number = m.number_for(peer, self.now)
        fast = self.server.relay_peer_data(b"back", peer, self.port)
        if number is None:
            assert fast is None
        else:
            assert fast == (number.to_bytes(2, "big") + b"\x00\x04back", CLIENT)
        self.server.handle_peer_datagram(b"back", peer, self.port, 4, self.now)
        sent = [c for c in _drain(self.server) if isinstance(c, SendToClient)]
        permitted = m.alive(self.now) and m.perms.get(peer[0], 0.0) > self.now
        if not permitted:
            assert sent == []
        elif number is not None:
            assert sent == [SendToClient(number.to_bytes(2, "big") + b"\x00\x04back", CLIENT)]
        else:
            (cmd,) = sent
            ind = parse_message(cmd.data)
            assert ind.method == Method.DATA and ind.get(Attr.XOR_PEER_ADDRESS) == peer

    @invariant()
    def gauges_match(self) -> None:
        st_ = self.server.stats
        assert st_.allocations == (1 if self.model.alive(self.now) else 0)
        assert st_.drops.get("internal_error", 0) == 0
        assert st_.allocations >= 0 and st_.channels >= 0 and st_.permissions >= 0


def _drain(server):  # type: ignore[no-untyped-def]
    out = []
    while (c := server.poll_command()) is not None:
        out.append(c)
    return out


TurnMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_turn_server_state_machine = TurnMachine.TestCase
