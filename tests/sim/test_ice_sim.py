"""ICE + TURN allocations through the simulated network (RFC 4787 NATs, virtual time)."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firezone.proto.ice import (
    Candidate,
    Connected,
    Disconnected,
    Failed,
    IceAgent,
    NominatedPairChanged,
)
from firezone.proto.rng import SeededRng
from firezone.proto.stun import is_channel_data, is_stun
from firezone.proto.turn import make_credentials
from firezone.proto.turn.client import Allocation, AllocationLost, AllocationReady

from .simnet import (
    ADDRESS_AND_PORT_DEPENDENT as APD,
)
from .simnet import (
    ADDRESS_DEPENDENT as AD,
)
from .simnet import (
    ENDPOINT_INDEPENDENT as EI,
)
from .node_harness import RelayHost
from .simnet import SimNet

Addr = tuple[str, int]
TURN_PORT = 3478
RELAY_SECRET = b"\x07" * 32
UNIX0 = 1_800_000_000


class PeerNode:
    """One client or gateway: a socket, allocations on every relay, one ICE agent.

    A stand-in for ``proto/node.py``: it demultiplexes by source (a relay's TURN port) and by
    first byte (STUN / ChannelData), and signals its candidates to the other side directly.
    """

    def __init__(
        self,
        name: str,
        base: Addr,
        relays: list[Addr],
        controlling: bool,
        creds,
        now: float,
        seed: int,
    ) -> None:
        self.name = name
        self.base = base
        rng = SeededRng(f"peer:{seed}:{name}")
        lu, lp, ru, rp = creds
        self.agent = IceAgent(
            controlling=controlling,
            local_ufrag=lu,
            local_pwd=lp,
            remote_ufrag=ru,
            remote_pwd=rp,
            rng=rng,
            now=now,
        )
        user, pwd = make_credentials(RELAY_SECRET, f"{name}-public-key", UNIX0 + 86400)
        self.allocs = [
            Allocation(server=r, username=user, password=pwd, rng=rng, now=now, local=base)
            for r in relays
        ]
        self.by_server = {a.server: a for a in self.allocs}
        self.by_relayed: dict[Addr, Allocation] = {}
        self.other: PeerNode | None = None
        self.events: list[tuple[float, object]] = []
        self.out: deque[tuple[Addr, Addr, bytes]] = deque()
        self.add_local(Candidate.host(base), now)

    def add_local(self, c: Candidate, now: float) -> None:
        self.agent.add_local_candidate(c)
        assert True
        self._pending_signal.append(c.to_sdp()) if hasattr(self, "_pending_signal") else None

    def roam(self, new_base: Addr, now: float) -> None:
        """The host got a new address: new allocations, forget old local candidates."""
        for c in list(self.agent.local_candidates):
            self.agent.remove_local_candidate(c.base, now)
        for a in self.allocs:
            a.free(now)
        self.base = new_base
        rng = SeededRng(f"roam:{self.name}:{new_base}")
        user, pwd = make_credentials(RELAY_SECRET, f"{self.name}-public-key", UNIX0 + 86400)
        self.allocs = [
            Allocation(
                server=a.server, username=user, password=pwd, rng=rng, now=now, local=new_base
            )
            for a in self.allocs
        ]
        self.by_server = {a.server: a for a in self.allocs}
        self.by_relayed = {}
        self.agent.add_local_candidate(Candidate.host(new_base))
        self._pump(now)

    def signal_to(self, other: PeerNode, now: float) -> None:
        self.other = other
        for c in self.agent.local_candidates:
            other.agent.add_remote_candidate(Candidate.from_sdp(c.to_sdp()), now)

    def handle_datagram(self, src: Addr, dst: Addr, payload: bytes, now: float) -> None:
        alloc = self.by_server.get(src)
        if alloc is not None:
            if is_channel_data(payload):
                got = alloc.decapsulate(payload, src)
                if got is not None:
                    self.agent.handle_stun(bytes(got[1]), alloc.relayed_addrs[0], got[0], now)
            else:
                alloc.handle_input(payload, src, now)
        elif is_stun(payload):
            self.agent.handle_stun(payload, dst, src, now)
        self._pump(now)

    def handle_timeout(self, now: float) -> None:
        self.agent.handle_timeout(now)
        for a in self.allocs:
            a.handle_timeout(now)
        self._pump(now)

    def _pump(self, now: float) -> None:
        for a in self.allocs:
            while (ev := a.poll_event()) is not None:
                self.events.append((now, ev))
                if isinstance(ev, AllocationReady):
                    relay = Candidate.relayed(ev.relayed_addrs[0], a.server, ev.srflx)
                    self.by_relayed[ev.relayed_addrs[0]] = a
                    new = [relay]
                    if ev.srflx is not None:
                        new.append(Candidate.server_reflexive(ev.srflx, self.base, a.server))
                    for c in new:
                        self.agent.add_local_candidate(c)
                        if self.other is not None:
                            self.other.agent.add_remote_candidate(
                                Candidate.from_sdp(c.to_sdp()), now
                            )
                elif isinstance(ev, AllocationLost):
                    for r in ev.relayed_addrs:
                        self.agent.remove_local_candidate(r, now)
            while (pd := a.poll_peer_data()) is not None and a.relayed_addrs:
                self.agent.handle_stun(pd[1], a.relayed_addrs[0], pd[0], now)
        while (t := self.agent.poll_transmit()) is not None:
            if t.src == self.base:
                self.out.append((t.src, t.dst, t.payload))
            else:
                a = self.by_relayed.get(t.src)
                if a is not None:
                    data = a.encode_to_peer(t.dst, t.payload, now)
                    if data is not None:
                        self.out.append((self.base, a.server, data))
        for a in self.allocs:
            while (at := a.poll_transmit()) is not None:
                self.out.append((self.base, at.dst, at.payload))
        while (ev := self.agent.poll_event()) is not None:
            self.events.append((now, ev))

    def poll_transmit(self):
        return self.out.popleft() if self.out else None

    def poll_timeout(self) -> float | None:
        ds = [self.agent.poll_timeout(), *(a.poll_timeout() for a in self.allocs)]
        ds2 = [d for d in ds if d is not None]
        return min(ds2) if ds2 else None

    def ice_events(self, cls=None):
        return [e for _, e in self.events if cls is None or isinstance(e, cls)]


RELAY1, RELAY2 = ("203.0.113.101", TURN_PORT), ("203.0.113.102", TURN_PORT)
NATS = {
    # (mapping, filtering): RFC 4787 behaviours
    "full-cone": (EI, EI),
    "restricted": (EI, AD),
    "port-restricted": (EI, APD),
    "symmetric": (APD, APD),
}


def build(nat_a: str | None, nat_b: str | None, seed: int = 1, loss: float = 0.0):
    net = SimNet(seed)
    relays = []
    for i, r in enumerate((RELAY1, RELAY2)):
        net.add_host(f"relay{i + 1}", r[0], latency=0.005)
        node = RelayHost(r[0], r[0], seed, 0.0, secret=RELAY_SECRET)
        net.attach(f"relay{i + 1}", node)
        relays.append(node)
    a_ip, b_ip = "192.0.2.10", "192.0.2.130"
    if nat_a is not None:
        m, f = NATS[nat_a]
        net.add_nat("nat-a", "203.0.113.20", mapping=m, filtering=f)
    else:
        a_ip = "203.0.113.20"
    if nat_b is not None:
        m, f = NATS[nat_b]
        net.add_nat("nat-b", "203.0.113.30", mapping=m, filtering=f)
    else:
        b_ip = "203.0.113.30"
    net.add_host("client", a_ip, nat="nat-a" if nat_a else None, latency=0.020, loss=loss)
    net.add_host("gateway", b_ip, nat="nat-b" if nat_b else None, latency=0.015, loss=loss)
    creds_a = ("ufa", "p" * 22, "ufb", "q" * 22)
    creds_b = ("ufb", "q" * 22, "ufa", "p" * 22)
    a = PeerNode("client", (a_ip, 52625), [RELAY1, RELAY2], True, creds_a, 0.0, seed)
    b = PeerNode("gateway", (b_ip, 52625), [RELAY1, RELAY2], False, creds_b, 0.0, seed)
    net.attach("client", a)
    net.attach("gateway", b)
    a.signal_to(b, 0.0)
    b.signal_to(a, 0.0)
    return net, a, b


def connected(a: PeerNode, b: PeerNode):
    return lambda: a.agent.selected_pair is not None and b.agent.selected_pair is not None


def settle(net, a, b, duration=20.0):
    """Connect, then let the agents finish their checks (a better pair may still win)."""
    assert net.run(until=connected(a, b), duration=duration), (a.events, b.events)
    net.run(duration=duration)


@pytest.mark.parametrize(
    ("nat_a", "nat_b"),
    [
        (None, None),
        ("full-cone", "full-cone"),
        ("restricted", "restricted"),
        ("port-restricted", "port-restricted"),
        ("symmetric", "full-cone"),
        ("symmetric", "restricted"),
        ("restricted", "symmetric"),
    ],
)
def test_easy_nats_nominate_a_direct_pair(nat_a, nat_b):
    net, a, b = build(nat_a, nat_b)
    settle(net, a, b)
    kind = a.ice_events((Connected, NominatedPairChanged))[-1].kind
    assert kind == ("host" if nat_a is None and nat_b is None else "srflx")
    la, _ra = a.agent.selected_pair
    lb, _rb = b.agent.selected_pair
    assert la.kind == "host" and lb.kind == "host"
    assert not a.ice_events(Disconnected) and not b.ice_events(Disconnected)


@pytest.mark.parametrize(
    ("nat_a", "nat_b"),
    [
        ("symmetric", "symmetric"),
        ("symmetric", "port-restricted"),
        ("port-restricted", "symmetric"),
    ],
)
def test_hard_nats_nominate_a_relay_pair(nat_a, nat_b):
    net, a, b = build(nat_a, nat_b)
    settle(net, a, b)
    ev_a = a.ice_events((Connected, NominatedPairChanged))
    ev_b = b.ice_events((Connected, NominatedPairChanged))
    assert ev_a[-1].kind == "relay" and ev_b[-1].kind == "relay"
    assert not a.ice_events(Failed)
    # Both allocations on both relays were made up front.
    assert sum(isinstance(e, AllocationReady) for _, e in a.events) == 2


def test_relay_pair_survives_an_hour_of_refreshes_and_rebinds():
    net, a, b = build("symmetric", "symmetric")
    settle(net, a, b)
    net.run(duration=3600)
    assert not a.ice_events(Disconnected) and not b.ice_events(Disconnected)
    assert all(al.state.value == "ready" for al in a.allocs + b.allocs)
    assert not any(isinstance(e, AllocationLost) for _, e in a.events + b.events)


def test_connects_through_20_percent_loss():
    net, a, b = build("restricted", "restricted", seed=5, loss=0.2)
    assert net.run(until=connected(a, b), duration=30)
    assert net.dropped.get("loss", 0) > 0


def test_losing_the_relay_in_use_moves_to_the_other_relay():
    net, a, b = build("symmetric", "symmetric")
    settle(net, a, b)
    in_use = {RELAY1[0]: "relay1", RELAY2[0]: "relay2"}
    la, ra = a.agent.selected_pair
    relay_ip = la.addr[0] if la.kind == "relay" else ra.addr[0]
    used = in_use[relay_ip]
    net.set_up(used, False)
    net.run(duration=60)
    la, ra = a.agent.selected_pair
    assert (la.addr[0] if la.kind == "relay" else ra.addr[0]) != relay_ip
    assert a.ice_events(NominatedPairChanged)
    lost = [e for _, e in a.events if isinstance(e, AllocationLost)]
    assert [e.server[0] for e in lost] == [relay_ip]


def test_same_seed_same_trace_and_other_seed_differs():
    def run(seed):
        net, a, b = build("symmetric", "restricted", seed=seed)
        settle(net, a, b)
        return net.trace

    t1 = run(3)
    assert t1 == run(3)
    assert t1 != run(4)


def test_roaming_client_reconnects_after_an_ice_restart():
    net, a, b = build("restricted", "restricted")
    settle(net, a, b, duration=5)
    net.roam("client", "192.0.2.11")
    now = net.clock.now
    a.roam(("192.0.2.11", 52625), now)
    # The portal hands both sides fresh ICE credentials; each restarts and re-sends candidates.
    a.agent.restart("ufa2", "r" * 22, "ufb2", "s" * 22, now)
    b.agent.restart("ufb2", "s" * 22, "ufa2", "r" * 22, now)
    a.signal_to(b, now)
    b.signal_to(a, now)
    assert net.run(until=connected(a, b), duration=5)
    assert net.clock.now - now < 2.0
    assert a.agent.selected_pair[0].addr == ("192.0.2.11", 52625)
    assert [type(e).__name__ for e in a.ice_events((Connected,))] == ["Connected", "Connected"]


def _direct_possible(nat_a: str | None, nat_b: str | None) -> bool:
    # Hole punching fails when one side's mapping depends on the destination port and the
    # other side only admits the exact endpoint it sent to (or both map per destination).
    def mapping(n):
        return NATS[n][0] if n else EI

    def filtering(n):
        return NATS[n][1] if n else EI

    if mapping(nat_a) == APD and filtering(nat_b) == APD:
        return False
    return not (mapping(nat_b) == APD and filtering(nat_a) == APD)


@settings(max_examples=25, deadline=None)
@given(
    nat_a=st.sampled_from([None, *NATS]),
    nat_b=st.sampled_from([None, *NATS]),
    seed=st.integers(0, 2**16),
    loss=st.sampled_from([0.0, 0.05]),
)
def test_any_nat_combination_connects_over_the_best_possible_path(nat_a, nat_b, seed, loss):
    net, a, b = build(nat_a, nat_b, seed=seed, loss=loss)
    settle(net, a, b)
    expected_relay = not _direct_possible(nat_a, nat_b)
    for node in (a, b):
        kind = node.ice_events((Connected, NominatedPairChanged))[-1].kind
        assert (kind == "relay") is expected_relay, (nat_a, nat_b, node.name, kind)
