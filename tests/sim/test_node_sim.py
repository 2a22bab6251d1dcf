"""Node (ICE + TURN + WireGuard over one socket) end to end on the simulated network."""

from __future__ import annotations

import pytest

from firezone.proto.node import (
    MAX_BUFFERED,
    ConnectionClosed,
    ConnectionEstablished,
    ConnectionFailed,
    NewIceCandidate,
    PathChanged,
)
from firezone.proto.stun import is_channel_data

from .node_harness import RELAY_ADDRS, TURN_PORT, Sim, ip_packet
from .simnet import ADDRESS_AND_PORT_DEPENDENT as APD
from .simnet import ADDRESS_DEPENDENT as AD
from .simnet import ENDPOINT_INDEPENDENT as EI

NAT_KINDS = {"easy": (EI, AD), "symmetric": (APD, APD)}
RELAY_IPS = set(RELAY_ADDRS.values())


def build(nat_c: str | None, nat_g: str | None, seed: int = 1) -> Sim:
    """A client and a gateway, each behind its own NAT (or public), both signed in."""
    sim = Sim(seed)
    c_ip, g_ip = "192.0.2.10", "192.0.2.130"
    if nat_c is None:
        c_ip = "203.0.113.20"
    else:
        m, f = NAT_KINDS[nat_c]
        sim.net.add_nat("nat-c", "203.0.113.20", mapping=m, filtering=f)
    if nat_g is None:
        g_ip = "203.0.113.30"
    else:
        m, f = NAT_KINDS[nat_g]
        sim.net.add_nat("nat-g", "203.0.113.30", mapping=m, filtering=f)
    sim.add_node("client", c_ip, is_client=True, nat="nat-c" if nat_c else None)
    sim.add_node("gateway", g_ip, is_client=False, nat="nat-g" if nat_g else None, latency=0.02)
    return sim


def connect(
    sim: Sim, client: str = "client", gateway: str = "gateway", limit: float = 10.0
) -> float:
    t0 = sim.now
    sim.connect(client, gateway)
    assert sim.run(limit, until=lambda: sim.established(client, gateway)), (
        sim.hosts[client].events,
        sim.hosts[gateway].events,
    )
    return sim.now - t0


def ping_pong(sim: Sim, first: int, count: int = 5, a: str = "client", b: str = "gateway") -> None:
    """Send ``count`` packets each way; each must arrive exactly once."""
    ca, cb = sim.hosts[a], sim.hosts[b]
    for i in range(first, first + count):
        ca.send(b, ip_packet(i))
        cb.send(a, ip_packet(100_000 + i))
    sim.run(1.0)
    got_b, got_a = cb.received_seqs(a), ca.received_seqs(b)
    for i in range(first, first + count):
        assert got_b.count(i) == 1, (i, got_b)
        assert got_a.count(100_000 + i) == 1, (i, got_a)


def test_candidates_are_ready_before_any_connection():
    sim = build("easy", "easy")
    sim.run(1.0)
    kinds = sorted(c.kind for c in sim.hosts["client"].node.local_candidates)
    assert kinds == ["host", "relay", "relay", "srflx"]
    # Connecting signals all of them at once: nothing waits for an allocation.
    sim.connect("client", "gateway")
    signalled = sim.hosts["client"].of(NewIceCandidate, "gateway")
    assert len(signalled) == 4


def test_public_hosts_connect_on_a_host_path_and_pass_data_exactly_once():
    sim = build(None, None)
    sim.run(1.0)
    setup = connect(sim)
    assert setup < 1.0
    assert sim.hosts["client"].path("gateway") == "host"
    assert sim.hosts["gateway"].path("client") == "host"
    ping_pong(sim, 1)


def test_direct_path_behind_two_easy_nats():
    sim = build("easy", "easy")
    sim.run(1.0)
    connect(sim)
    sim.run(5.0)  # let ICE finish: a relayed pair must not win over the direct one
    c, g = sim.hosts["client"], sim.hosts["gateway"]
    assert c.path("gateway") == "srflx" and g.path("client") == "srflx"
    st = c.node.stats("gateway")
    assert st["remote"][0] == "203.0.113.30" and st["local"] == ("192.0.2.10", 52625)
    ping_pong(sim, 1)
    assert not c.of(ConnectionFailed) and not g.of(ConnectionFailed)


def test_relayed_path_behind_two_symmetric_nats_uses_channel_data():
    sim = build("symmetric", "symmetric")
    sim.run(1.0)
    connect(sim)
    sim.run(5.0)
    c, g = sim.hosts["client"], sim.hosts["gateway"]
    assert c.path("gateway") == "relay" and g.path("client") == "relay"
    to_relay: list[bytes] = []
    send = sim.net.send

    def spy(src, dst, payload):
        if dst[0] in RELAY_IPS and dst[1] == TURN_PORT:
            to_relay.append(payload)
        send(src, dst, payload)

    sim.net.send = spy  # type: ignore[method-assign]
    ping_pong(sim, 1)
    # One side's local candidate is a relay candidate: its WireGuard leaves as ChannelData
    # addressed to the relay's TURN port.
    locals_ = [c.node.stats("gateway")["local"], g.node.stats("client")["local"]]
    assert any(addr[0] in RELAY_IPS for addr in locals_)
    assert sum(is_channel_data(p) for p in to_relay) >= 5


def test_relay_fallback_when_udp_between_the_sites_is_blocked():
    sim = build("easy", "easy")
    sim.net.partition("nat-c", "nat-g")
    sim.run(1.0)
    connect(sim)
    sim.run(5.0)
    c, g = sim.hosts["client"], sim.hosts["gateway"]
    assert c.path("gateway") == "relay" and g.path("client") == "relay"
    ping_pong(sim, 1)
    assert sim.net.dropped.get("partition", 0) > 0  # hole punching was tried


def test_relay_in_use_restarting_with_new_credentials_recovers_without_loss():
    sim = build("symmetric", "symmetric")
    sim.run(1.0)
    connect(sim)
    sim.run(5.0)
    c, g = sim.hosts["client"], sim.hosts["gateway"]
    st = c.node.stats("gateway")
    relay_ip = st["remote"][0] if st["remote"][0] in RELAY_IPS else st["local"][0]
    name = next(n for n, ip in RELAY_ADDRS.items() if ip == relay_ip)
    t0 = sim.now
    sim.restart_relay(name)  # the portal sends everyone the relay's new credentials
    for i in range(1, 21):
        c.send("gateway", ip_packet(i))
        sim.run(0.5)
    got = g.received_seqs("client")
    assert sorted(got) == list(range(1, 21))  # buffered while the path moved, none lost
    changed = [t - t0 for t, e in c.events if isinstance(e, PathChanged) and t >= t0]
    assert changed and changed[0] < 2.0
    assert not c.of(ConnectionFailed) and not g.of(ConnectionFailed)
    sim.run(30.0)
    # The restarted relay allocated again under its new credentials.
    relayed = {cand.addr[0] for cand in c.node.local_candidates if cand.kind == "relay"}
    assert relayed == RELAY_IPS
    ping_pong(sim, 1000)


def test_rekey_every_120_s_keeps_traffic_flowing():
    sim = build("easy", "easy")
    sim.run(1.0)
    connect(sim)
    c, g = sim.hosts["client"], sim.hosts["gateway"]
    n = 0
    for _ in range(400):
        n += 1
        c.send("gateway", ip_packet(n))
        sim.run(1.0)
    assert sorted(g.received_seqs("client")) == list(range(1, n + 1))
    # Handshakes at ~0, ~120, ~240 and ~360 s.
    assert c.node.stats("gateway")["wg_handshakes"] >= 4
    assert not c.of(ConnectionFailed) and not g.of(ConnectionFailed)


def test_packets_are_buffered_while_connecting_and_the_buffer_is_bounded():
    sim = build("easy", "easy")
    sim.run(1.0)
    sim.connect("client", "gateway")
    c, g = sim.hosts["client"], sim.hosts["gateway"]
    total = MAX_BUFFERED + 40
    for i in range(total):
        assert not c.send("gateway", ip_packet(i))  # no path yet: buffered, nothing sent
    sim.run(5.0)
    got = g.received_seqs("client")
    assert got == list(range(total - MAX_BUFFERED, total))  # oldest dropped, order kept
    assert c.node.stats("gateway")["buffer_dropped"] == 40


def test_many_peers_share_one_socket():
    sim = Sim(7)
    sim.add_node("client", "203.0.113.20", is_client=True)
    sim.add_node("client2", "203.0.113.21", is_client=True)
    sim.add_node("gw1", "203.0.113.30", is_client=False)
    sim.add_node("gw2", "203.0.113.31", is_client=False)
    sim.run(1.0)
    for cl in ("client", "client2"):
        for gw in ("gw1", "gw2"):
            connect(sim, cl, gw)
    for i, (cl, gw) in enumerate((a, b) for a in ("client", "client2") for b in ("gw1", "gw2")):
        ping_pong(sim, 10 * i, 3, cl, gw)
    # Every datagram a node sent left from its one socket.
    for name in ("client", "gw1"):
        ip = sim.hosts[name].ip
        srcs = {t[2] for t in sim.net.trace if t[1] == "send" and t[2][0] == ip}
        assert srcs == {(ip, 52625)}


def test_ice_failure_is_reported_within_the_ice_timeout():
    sim = build("symmetric", "symmetric")
    sim.run(1.0)
    # Nothing gets through: no relay either.
    for a in ("nat-c", "nat-g"):
        for r in RELAY_ADDRS:
            sim.net.partition(a, r)
    sim.net.partition("nat-c", "nat-g")
    t0 = sim.now
    sim.connect("client", "gateway")
    sim.run(30.0, until=lambda: bool(sim.hosts["client"].of(ConnectionFailed)))
    failed = [(t, e) for t, e in sim.hosts["client"].events if isinstance(e, ConnectionFailed)]
    assert failed and failed[0][0] - t0 <= 17.0
    assert "ICE" in failed[0][1].reason
    assert sim.hosts["client"].node.connections() == []


def test_wireguard_handshake_failure_is_reported_after_the_rekey_attempt_time():
    sim = build(None, None)
    sim.run(1.0)
    c, g = sim.hosts["client"], sim.hosts["gateway"]
    t0 = sim.now
    sim.connect("client", "gateway", gateway_psk=b"\x01" * 32)  # ICE works, WireGuard cannot
    sim.run(40.0, until=lambda: bool(c.of(ConnectionFailed)))
    (failed,) = c.of(ConnectionFailed)
    assert failed.reason == "WireGuard handshake timed out"
    # Firezone caps rekey attempts on ICE connections at 20 s (plus the last retransmit wait).
    assert 20.0 <= sim.now - t0 <= 26.0
    assert not c.of(ConnectionEstablished) and not g.of(ConnectionEstablished)


def test_remove_connection_reports_closed_and_stops_data():
    sim = build(None, None)
    sim.run(1.0)
    connect(sim)
    c = sim.hosts["client"]
    c.node.remove_connection("gateway", sim.now)
    c.pump()
    assert c.of(ConnectionClosed) == [ConnectionClosed("gateway")]
    assert not c.send("gateway", ip_packet(1))


def test_roaming_client_reconnects_after_new_ice_credentials():
    sim = build("easy", "easy")
    sim.run(1.0)
    connect(sim)
    c = sim.hosts["client"]
    sim.net.roam("client", "192.0.2.11")
    c.node.add_local_interface(("192.0.2.11", 52625), sim.now)
    c.pump()
    t0 = sim.now
    sim.connect("client", "gateway")  # the portal re-authorizes with fresh ICE credentials
    sim.run(5.0, until=lambda: c.node.stats("gateway")["local"] == ("192.0.2.11", 52625))
    assert sim.now - t0 < 2.0
    ping_pong(sim, 1)


@pytest.mark.parametrize("seed", [3, 11])
def test_same_seed_same_trace(seed):
    def run(s: int) -> list:
        sim = build("symmetric", "easy", seed=s)
        sim.run(1.0)
        connect(sim)
        ping_pong(sim, 1)
        sim.run(150.0)
        return sim.net.trace

    t = run(seed)
    assert t == run(seed)
    assert t != run(seed + 1)


def test_established_event_carries_path_and_rtt():
    sim = build("easy", "easy")
    sim.run(1.0)
    connect(sim)
    (ev,) = sim.hosts["client"].of(ConnectionEstablished)
    assert ev.path == "srflx"
    assert ev.rtt is not None and 0.05 <= ev.rtt <= 0.2


@pytest.mark.parametrize("block_at", [0.0, 7.0, 19.0])
def test_direct_path_dying_silently_under_traffic_moves_to_a_relay(block_at):
    sim = build("easy", "easy")
    sim.run(1.0)
    connect(sim)
    c, g = sim.hosts["client"], sim.hosts["gateway"]
    sim.run(block_at)
    sim.net.partition("nat-c", "nat-g")  # nothing is signalled: the direct path just stops
    t0 = sim.now
    for i in range(1, 91):
        c.send("gateway", ip_packet(i))
        g.send("client", ip_packet(100_000 + i))
        sim.run(1.0)
    assert not c.of(ConnectionFailed) and not g.of(ConnectionFailed)
    assert c.path("gateway") == "relay" and g.path("client") == "relay"
    moved = next(t for t, e in c.events if isinstance(e, PathChanged) and t >= t0) - t0
    assert moved <= 41.0  # consent interval + check timeout at worst
    got = g.received_seqs("client")
    assert all(got.count(i) == 1 for i in range(int(moved) + 2, 91))
    assert sorted(set(got)) == sorted(got)  # never twice
