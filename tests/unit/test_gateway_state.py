"""GatewayState: authorizations, filters, DNS-resource NAT, flow tracking and timers — no sockets."""

from __future__ import annotations

import ipaddress
import json
import logging
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from firezone.proto import ip
from firezone.proto.gateway import (
    DNS_CACHE_TTL,
    DNS_TIMEOUT,
    FIN_LINGER,
    TCP_TTL,
    UDP_TTL,
    UNANSWERED_TTL,
    AccessExpired,
    ClientAccessEnded,
    ClientInfo,
    DnsQuery,
    FlowCompleted,
    FlowStarted,
    GatewayError,
    GatewayEvent,
    GatewayState,
)
from firezone.proto.rng import SeededRng

UNIX0 = 1_800_000_000.0
C4, C6 = "100.64.0.10", "fd00:2021:1111::a"
ALICE = ClientInfo("client-1", C4, C6, public_key="pk1", actor_email="alice@example.com")
BOB = ClientInfo("client-2", "100.64.0.11", "fd00:2021:1111::b", actor_email="bob@example.com")
P4 = ["100.96.0.1", "100.96.0.2", "100.96.0.3", "100.96.0.4"]
P6 = ["fd00:2021:1111:8000::1", "fd00:2021:1111:8000::2"]


def cidr(rid: str, address: str, filters: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"id": rid, "type": "cidr", "address": address, "name": rid, "filters": filters or []}


def dns(rid: str, address: str, filters: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"id": rid, "type": "dns", "address": address, "name": rid, "filters": filters or []}


def tcp_f(lo: int, hi: int | None = None) -> dict[str, Any]:
    return {
        "protocol": "tcp",
        "port_range_start": lo,
        "port_range_end": hi if hi is not None else lo,
    }


def udp_f(lo: int, hi: int | None = None) -> dict[str, Any]:
    return {
        "protocol": "udp",
        "port_range_start": lo,
        "port_range_end": hi if hi is not None else lo,
    }


ICMP_F = {"protocol": "icmp"}


class World:
    def __init__(self) -> None:
        self.now = 100.0
        self.gw = GatewayState(now=self.now, unix_time=UNIX0, rng=SeededRng("gw"))

    def advance(self, dt: float) -> None:
        """Move time forward, firing every deadline on the way (like the driver does)."""
        end = self.now + dt
        while (t := self.gw.poll_timeout()) is not None and t <= end:
            self.now = max(self.now, t)
            self.gw.handle_timeout(self.now)
        self.now = end
        self.gw.handle_timeout(self.now)

    def authorize(
        self, resource: dict[str, Any], client: ClientInfo = ALICE, expires_in: float | None = None
    ) -> None:
        exp = None if expires_in is None else UNIX0 + (self.now - 100.0) + expires_in
        self.gw.add_authorization(client, resource, exp, self.now)

    def send(self, packet: bytes, client: str = "client-1") -> ip.Packet | None:
        out = self.gw.handle_tunnel_packet(client, packet, self.now)
        if out is None:
            return None
        p = ip.parse(out)
        assert p is not None and p.checksums_ok()
        return p

    def reply(self, packet: bytes) -> tuple[str, ip.Packet] | None:
        out = self.gw.handle_tun_packet(packet, self.now)
        if out is None:
            return None
        p = ip.parse(out[1])
        assert p is not None and p.checksums_ok()
        return out[0], p

    def to_client(self) -> list[tuple[str, bytes]]:
        out = []
        while (x := self.gw.poll_tunnel_packet()) is not None:
            out.append(x)
        return out

    def events(self) -> list[GatewayEvent]:
        out = []
        while (e := self.gw.poll_event()) is not None:
            out.append(e)
        return out

    def queries(self) -> list[DnsQuery]:
        out = []
        while (q := self.gw.poll_dns_query()) is not None:
            out.append(q)
        return out

    def assign(self, rid: str, domain: str, proxies: list[str], client: str = "client-1") -> None:
        body = json.dumps({"resource": rid, "domain": domain, "proxy_ips": proxies}).encode()
        assert (
            self.gw.handle_tunnel_packet(
                client, ip.build_p2p_control(ip.P2P_ASSIGNED_IPS, body), self.now
            )
            is None
        )

    def resolve(self, domain: str, addresses: list[str] | None, ttl: float | None = None) -> None:
        qs = self.queries()
        assert [q.domain for q in qs] == [domain]
        self.gw.handle_dns_result(qs[0].id, addresses, ttl, self.now)


def statuses(packets: list[tuple[str, bytes]]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for cid, raw in packets:
        ctl = ip.parse_p2p_control(raw)
        assert ctl is not None and ctl[0] == ip.P2P_DOMAIN_STATUS
        out.append((cid, json.loads(ctl[1])))
    return out


def icmp_of(raw: bytes) -> tuple[int, int, bytes]:
    p = ip.parse(raw)
    assert p is not None and p.checksums_ok() and p.is_icmp_error
    return p.icmp_type, p.icmp_code, p.payload


@pytest.fixture
def w() -> World:
    return World()


# --- filters -------------------------------------------------------------------------------------
FILTERS = [tcp_f(80), tcp_f(8000, 8100), udp_f(53), ICMP_F]


@pytest.mark.parametrize(
    ("packet", "allowed"),
    [
        (ip.build_tcp(C4, "10.0.0.5", 4000, 80), True),
        (ip.build_tcp(C4, "10.0.0.5", 4000, 81), False),
        (ip.build_tcp(C4, "10.0.0.5", 4000, 8000), True),
        (ip.build_tcp(C4, "10.0.0.5", 4000, 8100), True),
        (ip.build_tcp(C4, "10.0.0.5", 4000, 8101), False),
        (ip.build_udp(C4, "10.0.0.5", 4000, 53), True),
        (ip.build_udp(C4, "10.0.0.5", 4000, 80), False),
        (ip.build_echo(C4, "10.0.0.5", 1, 1), True),
        (ip.build_ip(C4, "10.0.0.5", 47, b"gre!"), False),
    ],
    ids=["tcp80", "tcp81", "tcp8000", "tcp8100", "tcp8101", "udp53", "udp80", "icmp", "gre"],
)
def test_filters_per_protocol_and_port(w: World, packet: bytes, allowed: bool) -> None:
    w.authorize(cidr("r1", "10.0.0.0/24", FILTERS))
    out = w.send(packet)
    assert (out is not None) == allowed
    if allowed:
        assert out is not None and out.tobytes() == packet  # CIDR flows are forwarded untouched
        assert w.to_client() == []
    else:
        errs = w.to_client()
        assert len(errs) == 1 and errs[0][0] == "client-1"
        assert icmp_of(errs[0][1]) == (3, 13, packet)


def test_icmp_denied_when_not_in_filters(w: World) -> None:
    w.authorize(cidr("r1", "10.0.0.0/24", [tcp_f(22)]))
    assert w.send(ip.build_echo(C4, "10.0.0.5", 1, 1)) is None
    assert len(w.to_client()) == 1


def test_empty_filters_allow_everything(w: World) -> None:
    w.authorize(cidr("r1", "10.0.0.0/24"))
    for pkt in (
        ip.build_tcp(C4, "10.0.0.9", 1, 1),
        ip.build_udp(C4, "10.0.0.9", 2, 65535),
        ip.build_ip(C4, "10.0.0.9", 47, b"x"),
    ):
        assert w.send(pkt) is not None


def test_filter_with_missing_range_means_all_ports(w: World) -> None:
    w.authorize(cidr("r1", "10.0.0.0/24", [{"protocol": "udp"}]))
    assert w.send(ip.build_udp(C4, "10.0.0.9", 2, 65535)) is not None
    assert w.send(ip.build_tcp(C4, "10.0.0.9", 2, 65535)) is None


def test_prohibited_v6_is_icmpv6_code_1_quoting_the_packet(w: World) -> None:
    w.authorize(cidr("r1", "2001:db8::/64", [tcp_f(443)]))
    pkt = ip.build_udp(C6, "2001:db8::5", 5000, 443, b"quic")
    assert w.send(pkt) is None
    [(_, err)] = w.to_client()
    p = ip.parse(err)
    assert p is not None and p.src_ip == "2001:db8::5" and p.dst_ip == C6
    assert icmp_of(err) == (1, 1, pkt)


def test_prohibited_error_is_sent_exactly_once_per_refused_packet(w: World) -> None:
    w.authorize(cidr("r1", "10.0.0.0/24", [tcp_f(80)]))
    pkt = ip.build_tcp(C4, "10.0.0.5", 4000, 22)
    assert w.send(pkt) is None
    errs = w.to_client()
    assert len(errs) == 1
    assert ip.prohibited_quoted_dst(errs[0][1]) == (4, int.from_bytes(bytes([10, 0, 0, 5]), "big"))
    assert w.to_client() == []
    assert w.gw.flow_count == 0


def test_unauthorized_destination_is_prohibited(w: World) -> None:
    w.authorize(cidr("r1", "10.0.0.0/24"))
    assert w.send(ip.build_tcp(C4, "10.0.1.5", 4000, 80)) is None
    assert icmp_of(w.to_client()[0][1])[:2] == (3, 13)


def test_longest_prefix_decides_which_filters_apply(w: World) -> None:
    w.authorize(cidr("wide", "10.0.0.0/8"))
    w.authorize(cidr("narrow", "10.1.0.0/16", [tcp_f(443)]))
    assert w.send(ip.build_tcp(C4, "10.2.0.1", 1, 22)) is not None
    assert w.send(ip.build_tcp(C4, "10.1.0.1", 1, 22)) is None
    assert w.send(ip.build_tcp(C4, "10.1.0.1", 1, 443)) is not None
    started = [e for e in w.events() if isinstance(e, FlowStarted)]
    assert [e.resource_id for e in started] == ["wide", "narrow"]


def test_ip_resource_is_a_single_host(w: World) -> None:
    w.gw.add_authorization(
        ALICE, {"id": "h", "type": "ip", "address": "192.0.2.7", "filters": []}, None, w.now
    )
    assert w.send(ip.build_udp(C4, "192.0.2.7", 1, 2)) is not None
    assert w.send(ip.build_udp(C4, "192.0.2.8", 1, 2)) is None


def test_internet_resource_allows_global_but_not_private_addresses(w: World) -> None:
    w.gw.add_authorization(ALICE, {"id": "inet", "type": "internet"}, None, w.now)
    assert w.send(ip.build_tcp(C4, "1.1.1.1", 1, 443)) is not None
    assert w.send(ip.build_tcp(C4, "203.0.113.53", 1, 443)) is not None  # documentation = lab internet
    for private in ("192.168.1.1", "10.1.2.3", "172.16.0.1", "100.64.0.5", "127.0.0.1", "169.254.1.1", "224.0.0.1"):
        assert w.send(ip.build_tcp(C4, private, 1, 443)) is None, private


def test_spoofed_source_is_dropped_silently(w: World) -> None:
    w.authorize(cidr("r1", "10.0.0.0/24"))
    assert w.send(ip.build_tcp("100.64.0.99", "10.0.0.5", 1, 80)) is None
    assert w.to_client() == []
    assert w.gw.counters["tunnel_spoofed_source"] == 1


def test_other_clients_packets_are_judged_by_their_own_authorizations(w: World) -> None:
    w.authorize(cidr("r1", "10.0.0.0/24"))
    w.authorize(cidr("r2", "10.9.0.0/24"), client=BOB)
    assert w.send(ip.build_tcp("100.64.0.11", "10.0.0.5", 1, 80), client="client-2") is None
    assert w.send(ip.build_tcp("100.64.0.11", "10.9.0.5", 1, 80), client="client-2") is not None


def test_garbage_from_the_tunnel_is_counted_not_raised(w: World) -> None:
    w.authorize(cidr("r1", "10.0.0.0/24"))
    assert w.gw.handle_tunnel_packet("client-1", b"\x45garbage", w.now) is None
    assert w.gw.handle_tunnel_packet("nobody", ip.build_udp(C4, "10.0.0.1", 1, 2), w.now) is None
    assert w.gw.counters["tunnel_malformed"] == 1 and w.gw.counters["tunnel_unknown_client"] == 1


def test_malformed_resource_is_api_misuse(w: World) -> None:
    with pytest.raises(GatewayError):
        w.gw.add_authorization(
            ALICE, {"id": "x", "type": "cidr", "address": "not-a-net"}, None, w.now
        )


# --- replies -------------------------------------------------------------------------------------
def test_replies_go_back_to_the_right_client(w: World) -> None:
    w.authorize(cidr("r1", "10.0.0.0/24"))
    w.authorize(cidr("r1", "10.0.0.0/24"), client=BOB)
    assert w.send(ip.build_udp(C4, "10.0.0.5", 1000, 53)) is not None
    assert w.send(ip.build_udp("100.64.0.11", "10.0.0.5", 1000, 53), client="client-2") is not None
    a = w.reply(ip.build_udp("10.0.0.5", C4, 53, 1000, b"a"))
    b = w.reply(ip.build_udp("10.0.0.5", "100.64.0.11", 53, 1000, b"b"))
    assert a is not None and a[0] == "client-1" and a[1].payload == b"a"
    assert b is not None and b[0] == "client-2" and b[1].payload == b"b"


def test_unsolicited_packets_from_the_tun_are_dropped(w: World) -> None:
    w.authorize(cidr("r1", "10.0.0.0/24"))
    assert w.reply(ip.build_tcp("10.0.0.5", C4, 80, 4000, flags=ip.TCP_SYN)) is None
    assert w.gw.handle_tun_packet(b"junk", w.now) is None


# --- authorization lifetime ----------------------------------------------------------------------
def test_reject_access_is_immediate(w: World) -> None:
    w.authorize(cidr("r1", "10.0.0.0/24"))
    w.authorize(cidr("r2", "10.1.0.0/24"))
    pkt = ip.build_tcp(C4, "10.0.0.5", 4000, 80)
    assert w.send(pkt) is not None
    w.events()
    w.gw.remove_authorization("client-1", "r1", w.now)
    assert w.send(pkt) is None
    assert icmp_of(w.to_client()[0][1])[:2] == (3, 13)
    assert w.reply(ip.build_tcp("10.0.0.5", C4, 80, 4000)) is None
    [done] = w.events()
    assert isinstance(done, FlowCompleted) and done.reason == "access_removed"


def test_last_authorization_gone_tells_the_driver(w: World) -> None:
    w.authorize(cidr("r1", "10.0.0.0/24"))
    w.gw.remove_authorization("client-1", "r1", w.now)
    assert w.events() == [ClientAccessEnded("client-1")]


def test_authorization_expires(w: World) -> None:
    w.authorize(cidr("r1", "10.0.0.0/24"), expires_in=60)
    pkt = ip.build_udp(C4, "10.0.0.5", 4000, 53)
    assert w.send(pkt) is not None
    assert w.gw.poll_timeout() == pytest.approx(w.now + 60)
    w.advance(59)
    assert w.send(pkt) is not None
    w.events()
    w.advance(1.5)
    ev = w.events()
    assert AccessExpired("client-1", "r1") in ev and ClientAccessEnded("client-1") in ev
    assert any(isinstance(e, FlowCompleted) and e.reason == "access_expired" for e in ev)
    assert w.send(pkt) is None
    assert len(w.to_client()) == 1


def test_reauthorizing_extends_expiry(w: World) -> None:
    w.authorize(cidr("r1", "10.0.0.0/24"), expires_in=10)
    w.authorize(cidr("r1", "10.0.0.0/24"), expires_in=100)
    w.advance(50)
    assert w.gw.authorized_resources("client-1") == ["r1"]


def test_update_resource_applies_new_filters_to_existing_flows(w: World) -> None:
    w.authorize(cidr("r1", "10.0.0.0/24"))
    w.authorize(cidr("r1", "10.0.0.0/24"), client=BOB)
    ssh = ip.build_tcp(C4, "10.0.0.5", 4000, 22)
    web = ip.build_tcp(C4, "10.0.0.5", 4001, 80)
    assert w.send(ssh) is not None and w.send(web) is not None
    w.events()
    w.gw.update_resource(cidr("r1", "10.0.0.0/24", [tcp_f(80)]), w.now)
    [done] = w.events()
    assert (
        isinstance(done, FlowCompleted) and done.dst_port == 22 and done.reason == "access_changed"
    )
    assert w.send(ssh) is None
    assert w.send(web) is not None
    assert w.send(ip.build_tcp("100.64.0.11", "10.0.0.5", 1, 22), client="client-2") is None


def test_remove_client_ends_its_flows(w: World) -> None:
    w.authorize(cidr("r1", "10.0.0.0/24"))
    assert w.send(ip.build_udp(C4, "10.0.0.5", 1, 2)) is not None
    w.events()
    w.gw.remove_client("client-1", w.now)
    [done] = w.events()
    assert isinstance(done, FlowCompleted) and done.reason == "client_removed"
    assert w.gw.client_ids == [] and w.gw.flow_count == 0


# --- DNS resources -------------------------------------------------------------------------------
def dns_world(
    w: World, addresses: list[str] | None = None, filters: list[dict[str, Any]] | None = None
) -> None:
    w.authorize(dns("web", "*.example.com", filters))
    w.assign("web", "app.example.com", P4 + P6)
    w.resolve(
        "app.example.com", ["203.0.113.10", "203.0.113.11"] if addresses is None else addresses
    )


def test_assigned_ips_resolve_then_nat_both_ways(w: World) -> None:
    w.authorize(dns("web", "*.example.com"))
    w.assign("web", "App.Example.com.", P4 + P6)
    assert w.to_client() == []  # nothing until the name resolved
    w.resolve("app.example.com", ["203.0.113.10", "2001:db8::10"])
    assert statuses(w.to_client()) == [
        ("client-1", {"resource": "web", "domain": "app.example.com", "status": "active"})
    ]
    out = w.send(ip.build_tcp(C4, P4[0], 5000, 443, b"hello", flags=ip.TCP_SYN))
    assert out is not None and (out.src_ip, out.sport, out.dst_ip, out.dport) == (
        C4,
        5000,
        "203.0.113.10",
        443,
    )
    assert out.payload == b"hello"
    back = w.reply(
        ip.build_tcp("203.0.113.10", C4, 443, 5000, b"world", flags=ip.TCP_SYN | ip.TCP_ACK)
    )
    assert back is not None
    cid, p = back
    assert cid == "client-1" and (p.src_ip, p.sport, p.dst_ip, p.dport) == (P4[0], 443, C4, 5000)
    out6 = w.send(ip.build_udp(C6, P6[1], 6000, 443, b"q6"))
    assert out6 is not None and out6.dst_ip == "2001:db8::10"
    [s1, _] = w.events()
    assert (
        isinstance(s1, FlowStarted)
        and s1.domain == "app.example.com"
        and s1.real_dst_ip == "203.0.113.10"
    )
    assert s1.dst_ip == P4[0] and s1.user == "alice@example.com"


def test_proxy_ips_map_round_robin_per_family(w: World) -> None:
    dns_world(w)
    w.to_client()
    reals = []
    for proxy in P4:
        out = w.send(ip.build_udp(C4, proxy, 7000, 53))
        assert out is not None
        reals.append(out.dst_ip)
    assert reals == ["203.0.113.10", "203.0.113.11", "203.0.113.10", "203.0.113.11"]


def test_icmp_echo_through_dns_resource(w: World) -> None:
    dns_world(w, filters=[ICMP_F])
    out = w.send(ip.build_echo(C4, P4[0], 42, 1, b"ping"))
    assert out is not None and out.dst_ip == "203.0.113.10" and out.icmp_id == 42
    back = w.reply(ip.build_echo("203.0.113.10", C4, 42, 1, b"ping", reply=True))
    assert back is not None and back[1].src_ip == P4[0]


def test_two_names_on_one_real_ip_stay_separate_with_port_remap(w: World) -> None:
    w.authorize(dns("a", "a.example.com"))
    w.authorize(dns("b", "b.example.com", [tcp_f(22)]))
    w.assign("a", "a.example.com", ["100.96.0.1"])
    w.resolve("a.example.com", ["203.0.113.5"])
    w.assign("b", "b.example.com", ["100.96.0.2"])
    w.resolve("b.example.com", ["203.0.113.5"])
    w.to_client()
    out_a = w.send(ip.build_udp(C4, "100.96.0.1", 5000, 443, b"a"))
    out_b = w.send(ip.build_udp(C4, "100.96.0.2", 5000, 443, b"b"))
    assert out_b is None  # b only allows tcp/22 although the real IP is the same
    out_b = w.send(ip.build_tcp(C4, "100.96.0.2", 5000, 22, b"b"))
    out_b2 = w.send(ip.build_udp(C4, "100.96.0.1", 5000, 22, b"a2"))
    assert out_a is not None and out_b is not None and out_b2 is not None
    assert (
        out_a.sport == 5000 and out_b.sport == 5000 and out_b2.sport == 5000
    )  # no collision: other tuples


def test_colliding_flows_get_the_next_free_outside_port(w: World) -> None:
    w.authorize(dns("a", "a.example.com"))
    w.authorize(dns("b", "b.example.com"))
    w.assign("a", "a.example.com", ["100.96.0.1"])
    w.resolve("a.example.com", ["203.0.113.5"])
    w.assign("b", "b.example.com", ["100.96.0.2"])
    w.resolve("b.example.com", ["203.0.113.5"])
    w.to_client()
    out_a = w.send(ip.build_udp(C4, "100.96.0.1", 5000, 443, b"a"))
    out_b = w.send(ip.build_udp(C4, "100.96.0.2", 5000, 443, b"b"))
    out_c = w.send(ip.build_udp(C4, "100.96.0.2", 5001, 443, b"c"))
    assert out_a is not None and out_b is not None and out_c is not None
    assert (out_a.sport, out_b.sport, out_c.sport) == (5000, 5001, 5002)
    assert out_a.dst_ip == out_b.dst_ip == out_c.dst_ip == "203.0.113.5"
    back_b = w.reply(ip.build_udp("203.0.113.5", C4, 443, 5001, b"to-b"))
    back_a = w.reply(ip.build_udp("203.0.113.5", C4, 443, 5000, b"to-a"))
    back_c = w.reply(ip.build_udp("203.0.113.5", C4, 443, 5002, b"to-c"))
    assert back_a is not None and back_b is not None and back_c is not None
    assert (back_a[1].src_ip, back_a[1].dport) == ("100.96.0.1", 5000)
    assert (back_b[1].src_ip, back_b[1].dport) == ("100.96.0.2", 5000)
    assert (back_c[1].src_ip, back_c[1].dport) == ("100.96.0.2", 5001)
    ev = [e for e in w.events() if isinstance(e, FlowStarted)]
    assert [e.domain for e in ev] == ["a.example.com", "b.example.com", "b.example.com"]


def test_echo_identifier_remapped_on_collision(w: World) -> None:
    w.authorize(dns("a", "a.example.com"))
    w.authorize(dns("b", "b.example.com"))
    w.assign("a", "a.example.com", ["100.96.0.1"])
    w.resolve("a.example.com", ["203.0.113.5"])
    w.assign("b", "b.example.com", ["100.96.0.2"])
    w.resolve("b.example.com", ["203.0.113.5"])
    assert w.send(ip.build_echo(C4, "100.96.0.1", 9, 1)) is not None
    out = w.send(ip.build_echo(C4, "100.96.0.2", 9, 1))
    assert out is not None and out.icmp_id == 10
    back = w.reply(ip.build_echo("203.0.113.5", C4, 10, 1, reply=True))
    assert back is not None and back[1].src_ip == "100.96.0.2" and back[1].icmp_id == 9


def test_icmp_error_from_the_tun_is_translated_for_dns_flows(w: World) -> None:
    dns_world(w)
    out = w.send(ip.build_udp(C4, P4[0], 5000, 9999, b"knock"))
    assert out is not None
    err = ip.icmp_unreachable(out.tobytes(), 3, 4)  # port unreachable from the real host
    assert err is not None
    back = w.reply(err)
    assert back is not None
    cid, p = back
    assert cid == "client-1" and p.src_ip == P4[0]
    q = p.icmp_quoted()
    assert q is not None and (q.src_ip, q.sport, q.dst_ip, q.dport) == (C4, 5000, P4[0], 9999)
    assert q.checksums_ok()


def test_unresolvable_name_answers_host_unreachable(w: World) -> None:
    w.authorize(dns("web", "*.example.com"))
    w.assign("web", "nx.example.com", P4 + P6)
    w.resolve("nx.example.com", None)
    assert statuses(w.to_client())[0][1]["status"] == "inactive"
    pkt = ip.build_tcp(C4, P4[0], 5000, 443)
    assert w.send(pkt) is None
    [(_, err)] = w.to_client()
    assert icmp_of(err) == (3, 1, pkt)


def test_missing_family_answers_address_unreachable(w: World) -> None:
    dns_world(w, addresses=["203.0.113.10"])
    w.to_client()
    pkt = ip.build_udp(C6, P6[0], 5000, 443)
    assert w.send(pkt) is None
    [(_, err)] = w.to_client()
    assert icmp_of(err) == (1, 3, pkt)


def test_dns_query_times_out_as_unresolvable(w: World) -> None:
    w.authorize(dns("web", "*.example.com"))
    w.assign("web", "slow.example.com", P4)
    assert len(w.queries()) == 1
    w.advance(DNS_TIMEOUT - 0.5)
    assert w.to_client() == []
    w.advance(1)
    assert statuses(w.to_client())[0][1]["status"] == "inactive"
    assert w.gw.counters["dns_timeout"] == 1


def test_concurrent_assignments_share_one_query(w: World) -> None:
    w.authorize(dns("web", "*.example.com"))
    w.authorize(dns("web", "*.example.com"), client=BOB)
    w.assign("web", "app.example.com", P4)
    w.assign("web", "app.example.com", ["100.96.0.9"], client="client-2")
    w.resolve("app.example.com", ["203.0.113.10"])
    assert sorted(cid for cid, _ in statuses(w.to_client())) == ["client-1", "client-2"]


def test_resolution_is_cached_for_30_seconds(w: World) -> None:
    dns_world(w)
    w.advance(DNS_CACHE_TTL - 1)
    w.assign("web", "app.example.com", P4)
    assert w.queries() == []
    w.advance(2)
    w.assign("web", "app.example.com", P4)
    assert [q.domain for q in w.queries()] == ["app.example.com"]


def test_resolution_is_cached_for_its_ttl(w: World) -> None:
    w.authorize(dns("web", "*.example.com"))
    w.assign("web", "app.example.com", P4)
    w.resolve("app.example.com", ["203.0.113.10"], ttl=5)
    w.advance(6)
    w.assign("web", "app.example.com", P4)
    assert len(w.queries()) == 1


def test_new_resolution_applies_to_new_flows_only(w: World) -> None:
    dns_world(w, addresses=["203.0.113.10"])
    old = ip.build_udp(C4, P4[0], 5000, 53)
    assert w.send(old) is not None
    w.advance(DNS_CACHE_TTL + 1)
    w.assign("web", "app.example.com", P4)
    w.resolve("app.example.com", ["203.0.113.99"])
    o1 = w.send(old)
    o2 = w.send(ip.build_udp(C4, P4[0], 5001, 53))
    assert o1 is not None and o1.dst_ip == "203.0.113.10"
    assert o2 is not None and o2.dst_ip == "203.0.113.99"


@pytest.mark.parametrize(
    ("rid", "domain", "proxies", "counter"),
    [
        ("web", "other.org", P4, "control_not_authorized"),
        ("nope", "app.example.com", P4, "control_not_authorized"),
        ("web", "app.example.com", ["10.0.0.1"], "control_bad_proxy_ips"),
        ("web", "app.example.com", [], "control_bad_proxy_ips"),
    ],
)
def test_bad_assignments_are_ignored(
    w: World, rid: str, domain: str, proxies: list[str], counter: str
) -> None:
    w.authorize(dns("web", "*.example.com"))
    w.assign(rid, domain, proxies)
    assert w.queries() == [] and w.to_client() == []
    assert w.gw.counters[counter] == 1


def test_malformed_control_body_is_counted(w: World) -> None:
    w.authorize(dns("web", "*.example.com"))
    pkt = ip.build_p2p_control(ip.P2P_ASSIGNED_IPS, b"{not json")
    assert w.gw.handle_tunnel_packet("client-1", pkt, w.now) is None
    assert w.gw.counters["control_malformed"] == 1


def test_unknown_proxy_ip_is_prohibited(w: World) -> None:
    w.authorize(dns("web", "*.example.com"))
    assert w.send(ip.build_udp(C4, "100.96.0.77", 1, 53)) is None
    assert icmp_of(w.to_client()[0][1])[:2] == (3, 13)


def test_reject_access_drops_dns_mappings(w: World) -> None:
    dns_world(w)
    w.authorize(cidr("r2", "10.0.0.0/8"))
    pkt = ip.build_udp(C4, P4[0], 5000, 53)
    assert w.send(pkt) is not None
    w.gw.remove_authorization("client-1", "web", w.now)
    w.to_client()
    assert w.send(pkt) is None
    assert icmp_of(w.to_client()[0][1])[:2] == (3, 13)


def test_dns_resource_filters_apply(w: World) -> None:
    dns_world(w, filters=[tcp_f(443)])
    w.to_client()
    assert w.send(ip.build_tcp(C4, P4[0], 1, 443)) is not None
    assert w.send(ip.build_tcp(C4, P4[0], 1, 80)) is None
    assert icmp_of(w.to_client()[0][1])[:2] == (3, 13)


# --- flow lifetime -------------------------------------------------------------------------------
def completed(w: World) -> list[FlowCompleted]:
    return [e for e in w.events() if isinstance(e, FlowCompleted)]


def test_unanswered_flow_expires_after_60s(w: World) -> None:
    w.authorize(cidr("r1", "10.0.0.0/24"))
    w.send(ip.build_udp(C4, "10.0.0.5", 1, 2))
    w.advance(UNANSWERED_TTL - 1)
    assert w.gw.flow_count == 1
    w.advance(2.5)
    assert w.gw.flow_count == 0
    [done] = completed(w)
    assert done.reason == "idle" and done.tx_packets == 0


def test_answered_udp_flow_lives_two_minutes_of_idleness(w: World) -> None:
    dns_world(w)
    w.send(ip.build_udp(C4, P4[0], 5000, 53))
    assert w.reply(ip.build_udp("203.0.113.10", C4, 53, 5000)) is not None
    w.advance(UDP_TTL - 1)
    assert w.gw.flow_count == 1
    w.advance(2.5)
    assert w.gw.flow_count == 0
    # The NAT entry is gone with it: a late reply no longer reaches the client.
    assert w.reply(ip.build_udp("203.0.113.10", C4, 53, 5000)) is None


def test_answered_tcp_flow_lives_two_hours_four_minutes(w: World) -> None:
    w.authorize(cidr("r1", "10.0.0.0/24"))
    w.send(ip.build_tcp(C4, "10.0.0.5", 1, 80, flags=ip.TCP_SYN))
    w.reply(ip.build_tcp("10.0.0.5", C4, 80, 1, flags=ip.TCP_SYN | ip.TCP_ACK))
    w.advance(TCP_TTL - 10)
    assert w.gw.flow_count == 1
    w.advance(12)
    assert w.gw.flow_count == 0


def test_traffic_keeps_a_flow_alive(w: World) -> None:
    w.authorize(cidr("r1", "10.0.0.0/24"))
    pkt = ip.build_udp(C4, "10.0.0.5", 1, 2)
    for _ in range(5):
        assert w.send(pkt) is not None
        assert w.reply(ip.build_udp("10.0.0.5", C4, 2, 1)) is not None
        w.advance(UDP_TTL - 10)
    assert w.gw.flow_count == 1


def test_rst_removes_flow_immediately(w: World) -> None:
    w.authorize(cidr("r1", "10.0.0.0/24"))
    w.send(ip.build_tcp(C4, "10.0.0.5", 1, 80, flags=ip.TCP_SYN))
    rst = w.reply(ip.build_tcp("10.0.0.5", C4, 80, 1, flags=ip.TCP_RST))
    assert rst is not None  # the RST itself still reaches the client
    assert w.gw.poll_timeout() == w.now
    w.gw.handle_timeout(w.now)
    assert w.gw.flow_count == 0
    assert completed(w)[0].reason == "closed"


def test_fin_both_ways_removes_flow_after_5s(w: World) -> None:
    w.authorize(cidr("r1", "10.0.0.0/24"))
    w.send(ip.build_tcp(C4, "10.0.0.5", 1, 80, flags=ip.TCP_SYN))
    w.reply(ip.build_tcp("10.0.0.5", C4, 80, 1, flags=ip.TCP_SYN | ip.TCP_ACK))
    w.send(ip.build_tcp(C4, "10.0.0.5", 1, 80, flags=ip.TCP_FIN | ip.TCP_ACK))
    w.advance(30)
    assert w.gw.flow_count == 1  # one FIN is a half-close
    w.reply(ip.build_tcp("10.0.0.5", C4, 80, 1, flags=ip.TCP_FIN | ip.TCP_ACK))
    w.send(ip.build_tcp(C4, "10.0.0.5", 1, 80, flags=ip.TCP_ACK))
    w.advance(FIN_LINGER - 1)
    assert w.gw.flow_count == 1
    w.advance(1.5)
    assert w.gw.flow_count == 0


def test_flow_events_count_bytes_and_packets_each_way(
    w: World, caplog: pytest.LogCaptureFixture
) -> None:
    dns_world(w)
    a = ip.build_udp(C4, P4[0], 5000, 53, b"x" * 100)
    b = ip.build_udp(C4, P4[0], 5000, 53, b"y" * 10)
    r = ip.build_udp("203.0.113.10", C4, 53, 5000, b"z" * 1000)
    w.send(a)
    w.send(b)
    w.reply(r)
    w.events()
    with caplog.at_level(logging.INFO, logger="firezone.flow_logs"):
        w.advance(UDP_TTL + 2)
    [done] = completed(w)
    assert (done.rx_bytes, done.rx_packets) == (len(a) + len(b), 2)
    assert (done.tx_bytes, done.tx_packets) == (len(r), 1)
    assert (done.client_id, done.user, done.resource_id, done.domain) == (
        "client-1",
        "alice@example.com",
        "web",
        "app.example.com",
    )
    assert (done.protocol, done.src_ip, done.src_port, done.dst_ip, done.dst_port) == (
        "udp",
        C4,
        5000,
        P4[0],
        53,
    )
    assert done.started_at == UNIX0 and done.ended_at > done.started_at
    [rec] = [r for r in caplog.records if r.name == "firezone.flow_logs"]
    assert rec.levelno == logging.INFO and "UDP flow completed" in rec.getMessage()
    assert rec.__dict__["domain"] == "app.example.com" and rec.__dict__["tx_bytes"] == len(r)


def test_poll_timeout_is_none_when_idle(w: World) -> None:
    assert w.gw.poll_timeout() is None
    w.authorize(cidr("r1", "10.0.0.0/24"))
    assert w.gw.poll_timeout() is None


# --- fragments -----------------------------------------------------------------------------------
def fragments(packet: bytes, cut: int) -> tuple[bytes, bytes]:
    """Split an IPv4 packet at payload offset ``cut`` (a multiple of 8) like a sender would."""
    p = ip.parse(packet)
    assert p is not None and p.version == 4 and cut % 8 == 0
    body = packet[20:]
    first = bytearray(packet[:20] + body[:cut])
    first[2:4] = len(first).to_bytes(2, "big")
    first[6:8] = (0x2000).to_bytes(2, "big")  # MF
    rest = bytearray(packet[:20] + body[cut:])
    rest[2:4] = len(rest).to_bytes(2, "big")
    rest[6:8] = (cut // 8).to_bytes(2, "big")
    for f in (first, rest):
        f[10:12] = b"\x00\x00"
        f[10:12] = ip.checksum(f[:20]).to_bytes(2, "big")
    return bytes(first), bytes(rest)


def reassemble(first: bytes, rest: bytes) -> ip.Packet:
    whole = bytearray(first[:20] + first[20:] + rest[20:])
    whole[2:4] = len(whole).to_bytes(2, "big")
    whole[6:8] = b"\x00\x00"
    p = ip.parse(whole)
    assert p is not None
    whole[10:12] = b"\x00\x00"
    whole[10:12] = ip.checksum(whole[:20]).to_bytes(2, "big")
    return p


def test_fragments_follow_their_first_fragment_through_dns_nat(w: World) -> None:
    dns_world(w)
    first, rest = fragments(ip.build_udp(C4, P4[0], 5000, 53, b"x" * 100), 48)
    out1 = w.gw.handle_tunnel_packet("client-1", first, w.now)
    out2 = w.gw.handle_tunnel_packet("client-1", rest, w.now)
    assert out1 is not None and out2 is not None
    whole = reassemble(out1, out2)
    assert whole.dst_ip == "203.0.113.10" and whole.payload == b"x" * 100
    assert whole.checksums_ok()  # the UDP checksum in the first fragment covers the translation
    r1, r2 = fragments(ip.build_udp("203.0.113.10", C4, 53, 5000, b"y" * 100), 48)
    back1 = w.gw.handle_tun_packet(r1, w.now)
    back2 = w.gw.handle_tun_packet(r2, w.now)
    assert back1 is not None and back2 is not None and back1[0] == back2[0] == "client-1"
    back = reassemble(back1[1], back2[1])
    assert back.src_ip == P4[0] and back.checksums_ok()


def test_fragment_without_a_flow_is_dropped(w: World) -> None:
    w.authorize(cidr("r1", "10.0.0.0/24"))
    _, rest = fragments(ip.build_udp(C4, "10.0.0.5", 1, 2, b"x" * 100), 48)
    assert w.send(rest) is None
    assert w.gw.counters["tunnel_fragment_without_flow"] == 1


# --- reference model -----------------------------------------------------------------------------
NETS = {"wide": "10.0.0.0/8", "mid": "10.1.0.0/16", "host": "10.1.2.3/32", "six": "2001:db8::/32"}
FILTER_CHOICES: list[list[dict[str, Any]]] = [
    [],
    [tcp_f(80)],
    [udp_f(53), ICMP_F],
    [tcp_f(1, 1000)],
]
DESTS = ["10.5.5.5", "10.1.9.9", "10.1.2.3", "2001:db8::1", "192.0.2.1"]
TRAFFIC = [("tcp", 80), ("tcp", 443), ("tcp", 5000), ("udp", 53), ("icmp", 0)]
CLIENTS = {"client-1": ALICE, "client-2": BOB}


class GatewayModel(RuleBasedStateMachine):
    """Forwarded exactly when the longest authorized prefix allows it; replies only for live flows."""

    def __init__(self) -> None:
        super().__init__()
        self.w = World()
        self.auths: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.flows: dict[tuple[str, str, str, int, int], str] = {}
        self.known: set[str] = set()
        self.sport = 1000

    def decide(self, cid: str, dst: str, proto: str, port: int) -> str | None:
        addr = ipaddress.ip_address(dst)
        best: tuple[int, str] | None = None
        for c, rid in self.auths:
            net = ipaddress.ip_network(NETS[rid])
            inside = c == cid and addr.version == net.version and addr in net
            if inside and (best is None or net.prefixlen > best[0]):
                best = (net.prefixlen, rid)
        if best is None:
            return None
        filters = self.auths[(cid, best[1])]
        if not filters:
            return best[1]
        for f in filters:
            if f["protocol"] == proto == "icmp":
                return best[1]
            if f["protocol"] == proto and f["port_range_start"] <= port <= f["port_range_end"]:
                return best[1]
        return None

    def prune(self) -> None:
        for key, rid in list(self.flows.items()):
            if self.decide(*key[:4]) != rid:
                del self.flows[key]

    def packet(self, cid: str, dst: str, proto: str, port: int, sport: int) -> bytes:
        info = CLIENTS[cid]
        src = info.ipv6 if ":" in dst else info.ipv4
        assert src is not None
        if proto == "tcp":
            return ip.build_tcp(src, dst, sport, port)
        if proto == "udp":
            return ip.build_udp(src, dst, sport, port)
        return ip.build_echo(src, dst, sport, 1)

    @rule(
        cid=st.sampled_from(sorted(CLIENTS)),
        rid=st.sampled_from(sorted(NETS)),
        filters=st.sampled_from(FILTER_CHOICES),
    )
    def authorize(self, cid: str, rid: str, filters: list[dict[str, Any]]) -> None:
        self.w.authorize(cidr(rid, NETS[rid], filters), client=CLIENTS[cid])
        self.auths[(cid, rid)] = filters
        self.known.add(cid)
        self.prune()

    @rule(cid=st.sampled_from(sorted(CLIENTS)), rid=st.sampled_from(sorted(NETS)))
    def revoke(self, cid: str, rid: str) -> None:
        self.w.gw.remove_authorization(cid, rid, self.w.now)
        self.auths.pop((cid, rid), None)
        self.prune()

    @rule(rid=st.sampled_from(sorted(NETS)), filters=st.sampled_from(FILTER_CHOICES))
    def update(self, rid: str, filters: list[dict[str, Any]]) -> None:
        self.w.gw.update_resource(cidr(rid, NETS[rid], filters), self.w.now)
        for key in self.auths:
            if key[1] == rid:
                self.auths[key] = filters
        self.prune()

    @rule(
        cid=st.sampled_from(sorted(CLIENTS)),
        dst=st.sampled_from(DESTS),
        traffic=st.sampled_from(TRAFFIC),
        reuse=st.booleans(),
    )
    def send(self, cid: str, dst: str, traffic: tuple[str, int], reuse: bool) -> None:
        proto, port = traffic
        if not reuse:
            self.sport += 1
        pkt = self.packet(cid, dst, proto, port, self.sport)
        rid = self.decide(cid, dst, proto, port)
        out = self.w.send(pkt, client=cid)
        errors = self.w.to_client()
        if cid not in self.known:
            assert out is None and errors == []
        elif rid is None:
            assert out is None
            assert len(errors) == 1 and errors[0][0] == cid
            assert ip.prohibited_quoted_dst(errors[0][1]) is not None
        else:
            assert out is not None and out.tobytes() == pkt and errors == []
            self.flows[(cid, dst, proto, port, self.sport)] = rid

    @rule(data=st.data())
    def reply(self, data: st.DataObject) -> None:
        sent = [k for k in self.flows]
        if not sent:
            return
        cid, dst, proto, port, sport = data.draw(st.sampled_from(sent))
        info = CLIENTS[cid]
        me = info.ipv6 if ":" in dst else info.ipv4
        assert me is not None
        if proto == "tcp":
            pkt = ip.build_tcp(dst, me, port, sport)
        elif proto == "udp":
            pkt = ip.build_udp(dst, me, port, sport)
        else:
            pkt = ip.build_echo(dst, me, sport, 1, reply=True)
        got = self.w.reply(pkt)
        assert got is not None and got[0] == cid and got[1].tobytes() == pkt

    @rule(cid=st.sampled_from(sorted(CLIENTS)), dst=st.sampled_from(DESTS))
    def stray_reply(self, cid: str, dst: str) -> None:
        info = CLIENTS[cid]
        me = info.ipv6 if ":" in dst else info.ipv4
        assert me is not None
        assert self.w.reply(ip.build_udp(dst, me, 7, 7)) is None  # port 7 is never a flow's source

    @invariant()
    def flow_count_matches(self) -> None:
        assert self.w.gw.flow_count == len(self.flows)


GatewayModel.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
test_gateway_reference_model = GatewayModel.TestCase


def test_client_info_from_portal_payload() -> None:
    info = ClientInfo.from_payload(
        {"id": "c9", "ipv4": "100.64.0.9", "ipv6": None, "public_key": "k", "preshared_key": "s"},
        {"actor_id": "a1", "actor_name": "Ann", "actor_email": "ann@example.com"},
    )
    assert info == ClientInfo("c9", "100.64.0.9", None, "k", "a1", "ann@example.com", "Ann")
    assert info.user == "ann@example.com"
    with pytest.raises(ValueError):
        ClientInfo.from_payload({"id": "c9", "ipv4": "nope"})
