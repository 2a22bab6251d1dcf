"""SimNet itself: RFC 4787 mapping and filtering, latency, loss, partitions, roaming."""

from __future__ import annotations

from collections import deque

import pytest

from .clock import VirtualClock
from .simnet import (
    ADDRESS_AND_PORT_DEPENDENT,
    ADDRESS_DEPENDENT,
    ENDPOINT_INDEPENDENT,
    SimNet,
)

Addr = tuple[str, int]


class Sink:
    """Records what arrives; sends what the test queues."""

    def __init__(self) -> None:
        self.got: list[tuple[float, Addr, Addr, bytes]] = []
        self.out: deque[tuple[Addr, Addr, bytes]] = deque()

    def handle_datagram(self, src: Addr, dst: Addr, payload: bytes, now: float) -> None:
        self.got.append((now, src, dst, payload))

    def handle_timeout(self, now: float) -> None:
        pass

    def poll_transmit(self):
        return self.out.popleft() if self.out else None

    def poll_timeout(self) -> float | None:
        return None


def lan(mapping=ENDPOINT_INDEPENDENT, filtering=ENDPOINT_INDEPENDENT, seed=0, loss=0.0):
    net = SimNet(seed)
    net.add_nat("nat", "203.0.113.20", mapping=mapping, filtering=filtering)
    inside = net.add_host("inside", "192.0.2.10", nat="nat", latency=0.01, loss=loss)
    s1 = net.add_host("s1", "203.0.113.101", latency=0.005)
    s2 = net.add_host("s2", "203.0.113.102", latency=0.005)
    nodes = {h.name: Sink() for h in (inside, s1, s2)}
    for name, node in nodes.items():
        net.attach(name, node)
    return net, nodes


IN = ("192.0.2.10", 5000)
S1 = ("203.0.113.101", 3478)
S1B = ("203.0.113.101", 3479)
S2 = ("203.0.113.102", 3478)


def mapped_for(net, nodes, dst):
    net.send(IN, dst, b"x")
    net.run(duration=1)
    name = {S1[0]: "s1", S2[0]: "s2"}[dst[0]]
    return nodes[name].got[-1][1]


def test_virtual_clock_only_moves_forward():
    c = VirtualClock(5.0)
    assert c.advance_to(3.0) == 5.0
    assert c.advance(1.5) == 6.5
    assert c.advance_to_next([None, 9.0, 7.0]) == 7.0
    assert c.advance_to_next([None]) is None
    with pytest.raises(ValueError):
        c.advance(-1)


def test_latency_is_the_sum_of_both_ends():
    net, nodes = lan()
    net.send(IN, S1, b"hello")
    net.run(duration=1)
    (t, src, dst, data) = nodes["s1"].got[0]
    assert t == pytest.approx(0.015) and dst == S1 and data == b"hello"
    assert src[0] == "203.0.113.20"


@pytest.mark.parametrize(
    ("mapping", "same_for_other_host", "same_for_other_port"),
    [
        (ENDPOINT_INDEPENDENT, True, True),
        (ADDRESS_DEPENDENT, False, True),
        (ADDRESS_AND_PORT_DEPENDENT, False, False),
    ],
)
def test_mapping_behaviours(mapping, same_for_other_host, same_for_other_port):
    net, nodes = lan(mapping=mapping)
    m1 = mapped_for(net, nodes, S1)
    m2 = mapped_for(net, nodes, S2)
    m3 = mapped_for(net, nodes, S1B)
    assert (m1 == m2) is same_for_other_host
    assert (m1 == m3) is same_for_other_port
    assert mapped_for(net, nodes, S1) == m1  # a mapping is reused


@pytest.mark.parametrize(
    ("filtering", "other_host_gets_in", "other_port_gets_in"),
    [
        (ENDPOINT_INDEPENDENT, True, True),
        (ADDRESS_DEPENDENT, False, True),
        (ADDRESS_AND_PORT_DEPENDENT, False, False),
    ],
)
def test_filtering_behaviours(filtering, other_host_gets_in, other_port_gets_in):
    net, nodes = lan(filtering=filtering)
    ext = mapped_for(net, nodes, S1)
    nodes["s2"].out.append((S2, ext, b"from-s2"))
    nodes["s1"].out.append((S1B, ext, b"from-s1-other-port"))
    nodes["s1"].out.append((S1, ext, b"reply"))
    net.run(duration=1)
    got = [g[3] for g in nodes["inside"].got]
    assert (b"from-s2" in got) is other_host_gets_in
    assert (b"from-s1-other-port" in got) is other_port_gets_in
    assert b"reply" in got
    assert nodes["inside"].got[-1][2] == IN  # translated back to the private address


def test_unsolicited_packets_and_private_addresses_do_not_get_in():
    net, nodes = lan()
    nodes["s1"].out.append((S1, ("203.0.113.20", 40000), b"nobody-mapped-this"))
    nodes["s1"].out.append((S1, IN, b"private"))
    net.run(duration=1)
    assert nodes["inside"].got == []
    assert net.dropped == {"nat-filter": 1, "unreachable": 1}


def test_mappings_expire_after_two_idle_minutes():
    net, nodes = lan()
    ext = mapped_for(net, nodes, S1)
    net.clock.advance(121)
    nodes["s1"].out.append((S1, ext, b"late"))
    net.run(duration=1)
    assert nodes["inside"].got == []


def test_partition_and_heal():
    net, nodes = lan()
    net.partition("inside", "s1")
    net.send(IN, S1, b"cut")
    net.run(duration=1)
    assert nodes["s1"].got == [] and net.dropped["partition"] == 1
    net.heal()
    net.send(IN, S1, b"again")
    net.run(duration=1)
    assert [g[3] for g in nodes["s1"].got] == [b"again"]


def test_link_down_drops_both_ways():
    net, nodes = lan()
    net.set_up("s1", False)
    net.send(IN, S1, b"x")
    net.run(duration=1)
    assert nodes["s1"].got == [] and net.dropped["link-down"] == 1


def test_roam_moves_a_host_to_a_new_address():
    net, nodes = lan()
    net.roam("inside", "192.0.2.11")
    net.send(("192.0.2.11", 5000), S1, b"roamed")
    net.send(IN, S1, b"old-address")
    net.run(duration=1)
    assert [g[3] for g in nodes["s1"].got] == [b"roamed"]
    assert net.dropped["no-such-source"] == 1


def test_loss_is_seeded():
    def run(seed):
        net, nodes = lan(seed=seed, loss=0.3)
        for i in range(200):
            net.send(IN, S1, bytes([i]))
        net.run(duration=1)
        return [g[3] for g in nodes["s1"].got]

    a = run(1)
    assert a == run(1)
    assert a != run(2)
    assert 100 < len(a) < 180
