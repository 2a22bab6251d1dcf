"""Candidates: RFC 8445 priorities, foundations, pair priorities and the SDP line."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firezone.proto.ice.candidate import (
    Candidate,
    candidate_foundation,
    candidate_priority,
    pair_priority,
)
from firezone.proto.ice.checklist import CheckList, PairState, rto_schedule


def test_priority_formula_matches_rfc8445_5_1_2_1():
    assert candidate_priority("host", 65535, 1) == (126 << 24) + (65535 << 8) + 255
    assert candidate_priority("srflx", 0, 1) == (100 << 24) + 255
    assert candidate_priority("relay", 65535, 1) == (65535 << 8) + 255


@pytest.mark.parametrize("ip", ["192.0.2.1", "2001:db8::1"])
def test_type_preference_orders_host_srflx_relay(ip):
    host = Candidate.host((ip, 1))
    srflx = Candidate.server_reflexive((ip, 2), (ip, 1), ("203.0.113.1", 3478))
    relay = Candidate.relayed((ip, 3), ("203.0.113.1", 3478))
    assert host.priority > srflx.priority > relay.priority


def test_ipv6_preferred_over_ipv4_of_the_same_type():
    assert Candidate.host(("2001:db8::1", 1)).priority > Candidate.host(("192.0.2.1", 1)).priority


def test_foundation_same_for_same_type_base_and_server():
    a = candidate_foundation("srflx", "192.0.2.1", "203.0.113.1")
    assert a == candidate_foundation("srflx", "192.0.2.1", "203.0.113.1")
    assert a != candidate_foundation("srflx", "192.0.2.1", "203.0.113.2")
    assert a != candidate_foundation("host", "192.0.2.1")
    assert a.isalnum() and len(a) <= 32


def test_pair_priority_rfc8445_6_1_2_3():
    g, d = 100, 200
    assert pair_priority(g, d) == (100 << 32) + 400
    assert pair_priority(d, g) == (100 << 32) + 400 + 1


def test_sdp_round_trip_with_related_address():
    c = Candidate.server_reflexive(
        ("198.51.100.7", 40000), ("192.0.2.10", 52625), ("203.0.113.101", 3478)
    )
    s = c.to_sdp()
    assert s.startswith(f"candidate:{c.foundation} 1 udp {c.priority} 198.51.100.7 40000 typ srflx")
    assert s.endswith("raddr 192.0.2.10 rport 52625")
    back = Candidate.from_sdp(s)
    assert (back.kind, back.addr, back.priority, back.foundation, back.related) == (
        "srflx",
        c.addr,
        c.priority,
        c.foundation,
        c.related,
    )
    assert Candidate.from_sdp("a=" + s).addr == c.addr


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "candidate:",
        "candidate:1 1 tcp 1 192.0.2.1 1 typ host",
        "candidate:1 1 udp 1 192.0.2.1 1 type host",
        "candidate:1 1 udp 1 not-an-ip 1 typ host",
        "candidate:1 1 udp 1 192.0.2.1 70000 typ host",
        "candidate:1 1 udp 0 192.0.2.1 1 typ host",
        "candidate:1 1 udp 1 192.0.2.1 1 typ bogus",
        "candidate:1 1 udp -5 192.0.2.1 1 typ host",
        "candidate:f/o 1 udp 1 192.0.2.1 1 typ host",
        "candidate:1 1 udp 1 192.0.2.1 1 typ srflx raddr x rport 1",
        "foo:1 1 udp 1 192.0.2.1 1 typ host",
    ],
)
def test_from_sdp_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        Candidate.from_sdp(bad)


ips = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)
ports = st.integers(0, 65535)


@given(
    kind=st.sampled_from(["host", "srflx", "prflx", "relay"]),
    ip=ips,
    port=ports,
    prio=st.integers(1, 2**32 - 1),
    foundation=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=32),
    component=st.integers(1, 256),
    related=st.one_of(st.none(), st.tuples(ips, ports)),
)
def test_sdp_round_trip_property(kind, ip, port, prio, foundation, component, related):
    c = Candidate(kind, (ip, port), (ip, port), prio, foundation, component, related)
    assert Candidate.from_sdp(c.to_sdp()) == c


@given(st.text(max_size=200))
def test_from_sdp_only_raises_value_error(s):
    try:
        Candidate.from_sdp(s)
    except ValueError:
        pass


@given(
    st.lists(
        st.sampled_from(
            ["candidate:", "1", "udp", "typ", "host", "192.0.2.1", "raddr", "rport", "9"]
        ),
        max_size=14,
    )
)
def test_from_sdp_token_soup_only_raises_value_error(tokens):
    try:
        Candidate.from_sdp(" ".join(tokens))
    except ValueError:
        pass


def test_rto_schedule_doubles_to_cap_for_12_attempts():
    sched = rto_schedule(0.25, 1.5, 12)
    assert sched[:4] == [0.25, 0.5, 1.0, 1.5]
    assert sched[4:] == [1.5] * 8
    assert sum(sched) == pytest.approx(15.25)


def test_checklist_orders_by_pair_priority_and_prunes_redundant_pairs():
    cl = CheckList()
    host = Candidate.host(("192.0.2.10", 52625))
    relay = Candidate.relayed(("203.0.113.101", 50000), ("203.0.113.101", 3478))
    r_host = Candidate.host(("192.0.2.140", 52625))
    r_srflx = Candidate.server_reflexive(
        ("198.51.100.2", 1000), ("192.0.2.140", 52625), ("203.0.113.101", 3478)
    )
    for lc in (relay, host):
        for rc in (r_srflx, r_host):
            cl.add(lc, rc, controlling=True)
    assert cl.add(host, r_host, controlling=True) is None  # redundant
    kinds = [(p.local.kind, p.remote.kind) for p in cl.pairs]
    assert kinds == [("host", "host"), ("host", "srflx"), ("relay", "host"), ("relay", "srflx")]
    assert cl.next_waiting().local.kind == "host"


def test_checklist_does_not_pair_across_address_families():
    cl = CheckList()
    assert (
        cl.add(Candidate.host(("192.0.2.1", 1)), Candidate.host(("2001:db8::1", 1)), True) is None
    )
    assert len(cl) == 0


def test_frozen_pairs_unfreeze_by_foundation_then_in_priority_order():
    cl = CheckList()
    h1 = Candidate.host(("192.0.2.1", 1))
    r1 = Candidate.host(("192.0.2.2", 1))
    r2 = Candidate.host(("192.0.2.2", 2))  # same foundation as r1
    p1 = cl.add(h1, r1, True)
    p2 = cl.add(h1, r2, True)
    assert p1.state == PairState.WAITING and p2.state == PairState.FROZEN
    cl.unfreeze_foundation(p1.foundation)
    assert p2.state == PairState.WAITING
