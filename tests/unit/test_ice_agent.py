"""IceAgent: two agents wired in memory (no sockets, virtual time)."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

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
from firezone.proto.ice.agent import MAX_REMOTE_CANDIDATES
from firezone.proto.rng import SeededRng
from firezone.proto.stun import Attr, Class, Message, Method

Addr = tuple[str, int]
A_HOST = ("192.0.2.10", 52625)
B_HOST = ("198.51.100.20", 52625)
A_RELAY = ("203.0.113.101", 50001)
B_RELAY = ("203.0.113.102", 50002)
PWD_A, PWD_B = "a" * 22, "b" * 22


def make_pair(a_controlling=True, b_controlling=False, now=0.0, **kw):
    a = IceAgent(
        controlling=a_controlling,
        local_ufrag="ufA",
        local_pwd=PWD_A,
        remote_ufrag="ufB",
        remote_pwd=PWD_B,
        rng=SeededRng(1),
        now=now,
        **kw,
    )
    b = IceAgent(
        controlling=b_controlling,
        local_ufrag="ufB",
        local_pwd=PWD_B,
        remote_ufrag="ufA",
        remote_pwd=PWD_A,
        rng=SeededRng(2),
        now=now,
        **kw,
    )
    return a, b


class Wire:
    """Delivers every Transmit to the agent owning its destination after ``latency``."""

    def __init__(
        self,
        owners: dict[Addr, IceAgent],
        latency: float = 0.01,
        drop: Callable[[Addr, Addr, float], bool] = lambda s, d, t: False,
    ) -> None:
        self.owners = owners
        self.latency = latency
        self.drop = drop
        self.now = 0.0
        self.q: list = []
        self.seq = 0
        self.events: list[tuple[float, str, object]] = []
        self.sent: list[tuple[float, Addr, Addr]] = []

    def name(self, ag):
        return "A" if ag is self.agents[0] else "B"

    @property
    def agents(self):
        out = []
        for ag in self.owners.values():
            if ag not in out:
                out.append(ag)
        return out

    def run(self, until: Callable[[], bool] = lambda: False, duration: float = 60.0) -> bool:
        end = self.now + duration
        while True:
            for ag in self.agents:
                while (t := ag.poll_transmit()) is not None:
                    self.sent.append((self.now, t.src, t.dst))
                    if not self.drop(t.src, t.dst, self.now):
                        self.seq += 1
                        heapq.heappush(self.q, (self.now + self.latency, self.seq, t))
                while (e := ag.poll_event()) is not None:
                    self.events.append((self.now, self.name(ag), e))
            if until():
                return True
            ds = [d for d in (ag.poll_timeout() for ag in self.agents) if d is not None]
            if self.q:
                ds.append(self.q[0][0])
            if not ds or min(ds) > end:
                self.now = end
                return until()
            self.now = max(self.now, min(ds))
            while self.q and self.q[0][0] <= self.now:
                _, _, t = heapq.heappop(self.q)
                owner = self.owners.get(t.dst)
                if owner is not None:
                    owner.handle_stun(t.payload, t.dst, t.src, self.now)
            for ag in self.agents:
                d = ag.poll_timeout()
                if d is not None and d <= self.now:
                    ag.handle_timeout(self.now)

    def of(self, who: str, cls=None):
        return [e for _, n, e in self.events if n == who and (cls is None or isinstance(e, cls))]


def exchange(a, b, a_cands, b_cands, now=0.0):
    for c in a_cands:
        a.add_local_candidate(c)
        b.add_remote_candidate(Candidate.from_sdp(c.to_sdp()), now)
    for c in b_cands:
        b.add_local_candidate(c)
        a.add_remote_candidate(Candidate.from_sdp(c.to_sdp()), now)


def host_pair(**kw):
    a, b = make_pair(**kw)
    exchange(a, b, [Candidate.host(A_HOST)], [Candidate.host(B_HOST)])
    return a, b, Wire({A_HOST: a, B_HOST: b})


def both_connected(a, b):
    return lambda: a.selected_pair is not None and b.selected_pair is not None


def test_two_agents_connect_over_host_candidates_and_agree_on_the_pair():
    a, b, w = host_pair()
    assert w.run(both_connected(a, b), duration=5)
    assert a.selected_pair[0].addr == A_HOST and a.selected_pair[1].addr == B_HOST
    assert b.selected_pair[0].addr == B_HOST and b.selected_pair[1].addr == A_HOST
    ev = w.of("A", Connected)[0]
    assert ev.kind == "host" and ev.rtt == pytest.approx(0.02)
    assert w.now < 0.2


def test_checks_retransmit_250ms_doubling_to_1_5s_then_fail_after_12_attempts():
    _a, _b, w = host_pair()
    w.drop = lambda s, d, t: True
    w.run(lambda: bool(w.of("A", Failed)), duration=30)
    times = [t for t, s, d in w.sent if s == A_HOST]
    gaps = [round(y - x, 3) for x, y in itertools.pairwise(times)]
    assert len(times) == 12
    assert gaps == [0.25, 0.5, 1.0] + [1.5] * 8
    assert w.of("A", Failed)[0].reason == "all candidate pairs failed"
    assert w.now == pytest.approx(15.25)


def test_checks_are_paced_ta_apart():
    a, _b = make_pair()
    remotes = [Candidate.host(("198.51.100.20", p)) for p in range(1000, 1005)]
    a.add_local_candidate(Candidate.host(A_HOST))
    for r in remotes:
        a.add_remote_candidate(r, 0.0)
    w = Wire({A_HOST: a}, drop=lambda s, d, t: True)
    w.run(duration=0.21)
    first = {}
    for t, s, d in w.sent:
        first.setdefault(d, t)
    starts = sorted(first.values())
    assert [round(y - x, 3) for x, y in itertools.pairwise(starts)] == [0.05] * 4


def test_direct_pair_beats_relayed_pair():
    a, b = make_pair()
    exchange(
        a,
        b,
        [Candidate.host(A_HOST), Candidate.relayed(A_RELAY, ("203.0.113.101", 3478))],
        [Candidate.host(B_HOST), Candidate.relayed(B_RELAY, ("203.0.113.102", 3478))],
    )
    w = Wire({A_HOST: a, A_RELAY: a, B_HOST: b, B_RELAY: b})
    w.run(duration=20)
    assert a.selected_pair[0].kind == "host" and a.selected_pair[1].kind == "host"
    assert b.selected_pair[0].kind == "host"


def test_switches_from_relayed_to_direct_when_hole_punching_succeeds_later():
    a, b = make_pair()
    exchange(
        a,
        b,
        [Candidate.host(A_HOST), Candidate.relayed(A_RELAY, ("203.0.113.101", 3478))],
        [Candidate.host(B_HOST)],
    )
    # The direct path opens only after 2 s (think of NAT mappings that need a few probes).
    w = Wire(
        {A_HOST: a, A_RELAY: a, B_HOST: b}, drop=lambda s, d, t: t < 2.0 and A_RELAY not in (s, d)
    )
    w.run(duration=20)
    assert [e.kind for e in w.of("A", Connected)] == ["relay"]
    assert [e.kind for e in w.of("A", NominatedPairChanged)] == ["host"]
    assert a.selected_pair[0].kind == "host"
    assert b.selected_pair[1].addr == A_HOST
    assert [type(e) for e in w.of("B")][:1] == [Connected]


def test_controlled_agent_learns_peer_reflexive_candidate():
    a, b = make_pair()
    a.add_local_candidate(Candidate.host(A_HOST))
    b.add_local_candidate(Candidate.host(B_HOST))
    a.add_remote_candidate(
        Candidate.from_sdp(Candidate.host(B_HOST).to_sdp()), 0.0
    )  # B never hears of A
    w = Wire({A_HOST: a, B_HOST: b})
    assert w.run(both_connected(a, b), duration=5)
    assert b.selected_pair[1].kind == "prflx" and b.selected_pair[1].addr == A_HOST
    assert w.of("B", Connected)[0].kind == "srflx"


def test_trickled_candidates_arriving_late_still_connect():
    a, b = make_pair()
    a.add_local_candidate(Candidate.host(A_HOST))
    b.add_local_candidate(Candidate.host(B_HOST))
    w = Wire({A_HOST: a, B_HOST: b})
    w.run(duration=3)
    assert a.selected_pair is None
    a.add_remote_candidate(Candidate.host(B_HOST), w.now)
    b.add_remote_candidate(Candidate.host(A_HOST), w.now)
    assert w.run(both_connected(a, b), duration=2)


def test_failed_when_no_remote_candidate_arrives():
    a, _b = make_pair()
    a.add_local_candidate(Candidate.host(A_HOST))
    w = Wire({A_HOST: a})
    w.run(lambda: bool(w.of("A", Failed)), duration=30)
    assert w.of("A", Failed)[0].reason == "no remote candidates"
    assert w.now == pytest.approx(10.0)


@pytest.mark.parametrize("controlling", [True, False])
def test_role_conflict_is_resolved_by_tie_breaker(controlling):
    a, b = make_pair(a_controlling=controlling, b_controlling=controlling)
    exchange(a, b, [Candidate.host(A_HOST)], [Candidate.host(B_HOST)])
    w = Wire({A_HOST: a, B_HOST: b})
    assert w.run(both_connected(a, b), duration=5)
    assert a.controlling != b.controlling
    winner = a if a.tiebreaker > b.tiebreaker else b
    assert winner.controlling


def test_consent_checks_every_25s_and_disconnect_when_they_stop():
    a, b, w = host_pair()
    assert w.run(both_connected(a, b), duration=5)
    t0 = w.now
    w.run(duration=60)
    consent = [t for t, s, d in w.sent if s == A_HOST and t > t0 + 1]
    assert consent and consent[0] == pytest.approx(t0 + 25, abs=0.1)
    assert not w.of("A", Disconnected)
    cut = w.now
    w.drop = lambda s, d, t: True
    w.run(lambda: bool(w.of("A", Disconnected)) and bool(w.of("B", Disconnected)), duration=60)
    assert a.selected_pair is None
    assert w.now - cut <= 25 + 15.25 + 0.1


def test_keeps_working_when_consent_is_answered():
    _a, _b, w = host_pair()
    w.run(duration=300)
    assert not w.of("A", Disconnected) and not w.of("B", Disconnected)
    assert len(w.of("A", Connected)) == 1


def test_restart_with_new_credentials_reconnects():
    a, b, w = host_pair()
    assert w.run(both_connected(a, b), duration=5)
    now = w.now
    a.restart("ufA2", "c" * 22, "ufB2", "d" * 22, now)
    b.restart("ufB2", "d" * 22, "ufA2", "c" * 22, now)
    assert a.selected_pair is None
    a.add_remote_candidate(Candidate.host(B_HOST), now)
    b.add_remote_candidate(Candidate.host(A_HOST), now)
    assert w.run(both_connected(a, b), duration=5)
    assert len(w.of("A", Connected)) == 2
    old = Message(Method.BINDING, Class.REQUEST, b"o" * 12)
    old.add(Attr.USERNAME, "ufA:ufB").add(Attr.PRIORITY, 1).add(Attr.ICE_CONTROLLED, 5)
    assert a.handle_stun(old.encode(key=PWD_A.encode()), A_HOST, B_HOST, w.now) is False


def test_check_for_another_ufrag_is_not_ours():
    a, _b, _w = host_pair()
    req = Message(Method.BINDING, Class.REQUEST, b"x" * 12)
    req.add(Attr.USERNAME, "someone-else:ufA").add(Attr.PRIORITY, 1).add(Attr.ICE_CONTROLLED, 5)
    assert a.handle_stun(req.encode(key=PWD_A.encode()), A_HOST, B_HOST, 0.0) is False
    assert a.poll_transmit() is None


def test_check_with_wrong_password_is_dropped_and_counted():
    a, _b, _w = host_pair()
    req = Message(Method.BINDING, Class.REQUEST, b"x" * 12)
    req.add(Attr.USERNAME, "ufA:ufB").add(Attr.PRIORITY, 1).add(Attr.ICE_CONTROLLED, 5)
    assert a.handle_stun(req.encode(key=b"wrong"), A_HOST, B_HOST, 0.0) is True
    assert a.poll_transmit() is None
    assert a.stats["bad_integrity"] == 1


def test_unsolicited_response_is_not_ours():
    a, _b, _w = host_pair()
    resp = Message(Method.BINDING, Class.SUCCESS, b"y" * 12, [(Attr.XOR_MAPPED_ADDRESS, A_HOST)])
    assert a.handle_stun(resp.encode(key=PWD_B.encode()), A_HOST, B_HOST, 0.0) is False


def test_prflx_candidates_are_bounded():
    a, _b, _w = host_pair()
    for i in range(MAX_REMOTE_CANDIDATES + 10):
        req = Message(Method.BINDING, Class.REQUEST, i.to_bytes(12, "big"))
        req.add(Attr.USERNAME, "ufA:ufB").add(Attr.PRIORITY, 1000).add(Attr.ICE_CONTROLLED, 5)
        a.handle_stun(req.encode(key=PWD_A.encode()), A_HOST, ("198.51.100.9", 1000 + i), 0.0)
    assert len(a.remote_candidates) == MAX_REMOTE_CANDIDATES


def test_same_seed_same_packets():
    def trace():
        _a, _b, w = host_pair()
        w.run(duration=60)
        return [(t, s, d) for t, s, d in w.sent]

    assert trace() == trace()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_never_raises(data):
    a, _b, _w = host_pair()
    assert a.handle_stun(data, A_HOST, B_HOST, 0.0) in (True, False)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=80), st.integers(0, 3))
def test_garbage_after_a_valid_stun_header_never_raises(tail, cls):
    m = Message(Method.BINDING, Class(cls), b"z" * 12)
    raw = bytearray(m.encode(fingerprint=False))
    raw[2:4] = len(tail).to_bytes(2, "big")
    a, _b, _w = host_pair()
    assert a.handle_stun(bytes(raw) + tail, A_HOST, B_HOST, 0.0) in (True, False)


_SOURCES = [B_HOST, ("198.51.100.21", 40000), ("2001:db8::5", 52625), B_RELAY]
_LOCALS = [A_HOST, A_RELAY, ("192.0.2.99", 1)]


@st.composite
def signed_inputs(draw):
    """Well-signed Binding requests/responses with arbitrary ICE attributes and addresses."""
    cls = draw(st.sampled_from([Class.REQUEST, Class.SUCCESS, Class.ERROR, Class.INDICATION]))
    m = Message(Method.BINDING, cls, draw(st.binary(min_size=12, max_size=12)))
    if cls == Class.REQUEST:
        m.add(Attr.USERNAME, draw(st.sampled_from(["ufA:ufB", "ufA:", "ufA:x:y"])))
        if draw(st.booleans()):
            m.add(Attr.PRIORITY, draw(st.integers(0, 2**32 - 1)))
        role = draw(st.sampled_from([None, Attr.ICE_CONTROLLING, Attr.ICE_CONTROLLED]))
        if role is not None:
            m.add(role, draw(st.integers(0, 2**64 - 1)))
        if draw(st.booleans()):
            m.add(Attr.USE_CANDIDATE, True)
        key = PWD_A.encode()
    else:
        if cls == Class.ERROR:
            m.add(Attr.ERROR_CODE, (draw(st.sampled_from([400, 487, 500])), "x"))
        elif draw(st.booleans()):
            m.add(Attr.XOR_MAPPED_ADDRESS, draw(st.sampled_from(_SOURCES)))
        key = PWD_B.encode()
    return (
        m.encode(key=key),
        draw(st.sampled_from(_LOCALS)),
        draw(st.sampled_from(_SOURCES)),
        draw(st.floats(0, 5)),
    )


@settings(max_examples=150, deadline=None)
@given(st.lists(signed_inputs(), max_size=25), st.booleans())
def test_signed_but_arbitrary_checks_keep_the_agent_consistent(inputs, controlling):
    a, _ = make_pair(a_controlling=controlling)
    a.add_local_candidate(Candidate.host(A_HOST))
    a.add_local_candidate(Candidate.relayed(A_RELAY, ("203.0.113.101", 3478)))
    a.add_remote_candidate(Candidate.host(B_HOST), 0.0)
    now = 0.0
    for data, local, remote, dt in inputs:
        now += dt
        # Answer our own outstanding transactions sometimes, by reusing their ids.
        t = a.poll_transmit()
        if t is not None and t.payload[0] == 0 and t.payload[1] == 1:
            txid = t.payload[8:20]
            resp = Message(Method.BINDING, Class.SUCCESS, txid, [(Attr.XOR_MAPPED_ADDRESS, t.src)])
            a.handle_stun(resp.encode(key=PWD_B.encode()), t.src, t.dst, now)
        assert a.handle_stun(data, local, remote, now) in (True, False)
        d = a.poll_timeout()
        if d is not None and d <= now:
            a.handle_timeout(now)
        while a.poll_event() is not None:
            pass
        sel = a.selected_pair
        if sel is not None:
            assert any(p.local == sel[0] and p.remote == sel[1] for p in a.checklist.pairs)
