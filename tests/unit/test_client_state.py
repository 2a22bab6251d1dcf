"""ClientState: routes, authorization on first packet, buffering, DNS resources, failover, status.

The client is wired in memory to gateways that are real :class:`~firezone.proto.node.Node` s (ICE
host candidates + WireGuard, instant delivery) and to a fake portal that records what the client
asks and answers with the dict messages the real portal sends.
"""

from __future__ import annotations

import ipaddress
import json
import struct
from typing import Any

import dns.message
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firezone.proto import ip as ipp
from firezone.proto.client import (
    ASSIGNED_IPS_INTERVAL,
    AUTHORIZATION_INTERVAL,
    GATEWAY_SILENT_TIMEOUT,
    MAX_BUFFERED_PER_DOMAIN,
    MAX_BUFFERED_PER_RESOURCE,
    AccessDenied,
    ClientState,
    ConnectionDown,
    ConnectionUp,
    GatewaySilent,
    PortalDisconnect,
    ResourcesChanged,
    TunInterfaceUpdated,
)
from firezone.proto.node import NewIceCandidate, Node
from firezone.proto.rng import SeededRng
from firezone.proto.wireguard import b64decode_key, b64encode_key, generate_private_key

UNIX0 = 1_800_000_000
CLIENT_ID = "client-1"
CLIENT_ADDR = ("192.0.2.10", 52625)
CLIENT_V4 = "100.64.0.10"
CLIENT_V6 = "fd00:2021:1111::a"
SITE = {"id": "site-1", "name": "HQ"}


# --- packets --------------------------------------------------------------------------------------


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def udp4(
    dst: str, seq: int = 0, *, src: str = CLIENT_V4, sport: int = 4000, dport: int = 5000
) -> bytes:
    """An IPv4/UDP packet whose payload is ``seq`` (what an application writes to the TUN)."""
    body = struct.pack("!Q", seq)
    s, d = ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed
    udp = struct.pack("!HHHH", sport, dport, 8 + len(body), 0) + body
    pseudo = s + d + struct.pack("!BBH", 0, 17, len(udp))
    udp = udp[:6] + struct.pack("!H", _csum(pseudo + udp) or 0xFFFF) + udp[8:]
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, s, d)
    hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
    return hdr + udp


def udp6(dst: str, seq: int = 0, *, src: str = CLIENT_V6) -> bytes:
    body = struct.pack("!Q", seq)
    s, d = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    udp = struct.pack("!HHHH", 4000, 5000, 8 + len(body), 0) + body
    pseudo = s + d + struct.pack("!IxxxB", len(udp), 17)
    udp = udp[:6] + struct.pack("!H", _csum(pseudo + udp) or 0xFFFF) + udp[8:]
    return struct.pack("!IHBB16s16s", 6 << 28, len(udp), 17, 64, s, d) + udp


def seq_of(packet: bytes) -> int:
    off = 28 if packet[0] >> 4 == 4 else 48
    return int(struct.unpack_from("!Q", packet, off)[0])


def dst_of(packet: bytes) -> str:
    if packet[0] >> 4 == 4:
        return str(ipaddress.IPv4Address(packet[16:20]))
    return str(ipaddress.IPv6Address(packet[24:40]))


def icmp4_prohibited(original: bytes, *, src: str) -> bytes:
    """ICMP destination unreachable, code 13 (RFC 1812 §5.2.7.1), quoting ``original``."""
    quote = original[:28]
    icmp = struct.pack("!BBHI", 3, 13, 0, 0) + quote
    icmp = icmp[:2] + struct.pack("!H", _csum(icmp)) + icmp[4:]
    s, d = ipaddress.IPv4Address(src).packed, original[12:16]
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0, 64, 1, 0, s, d)
    hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
    return hdr + icmp


def icmp_error(packet: bytes) -> tuple[int, int, bytes]:
    """(type, code, quoted bytes) of an ICMP / ICMPv6 error."""
    if packet[0] >> 4 == 4:
        ihl = (packet[0] & 0x0F) * 4
        assert packet[9] == 1, "not ICMP"
        return packet[ihl], packet[ihl + 1], packet[ihl + 8 :]
    assert packet[6] == 58, "not ICMPv6"
    return packet[40], packet[41], packet[48:]


def is_ping(packet: bytes) -> bool:
    return packet[0] >> 4 == 4 and packet[9] == 1 and packet[20] == 8


def echo_reply_for(packet: bytes, own_ip: str) -> bytes | None:
    """What a kernel answers to an ICMP echo request for ``own_ip``."""
    if not is_ping(packet) or dst_of(packet) != own_ip:
        return None
    icmp = b"\x00\x00\x00\x00" + packet[24:]
    icmp = icmp[:2] + struct.pack("!H", _csum(icmp)) + icmp[4:]
    hdr = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0, 64, 1, 0, packet[16:20], packet[12:16]
    )
    hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
    return hdr + icmp


def resource(
    rid: str, rtype: str, address: str | None = None, name: str | None = None, **extra: Any
) -> dict:
    r: dict[str, Any] = {
        "id": rid,
        "type": rtype,
        "name": name or rid,
        "sites": [SITE],
        "filters": [],
    }
    if address is not None:
        r["address"] = address
    r.update(extra)
    return r


def b64key(seed: str) -> str:
    return b64encode_key(SeededRng(seed).token_bytes(32))


# --- the in-memory world --------------------------------------------------------------------------


class FakeGateway:
    """A gateway host: a real Node (controlled side); it records the packets it decrypts."""

    def __init__(self, gid: str, ip: str, now: float, *, seed: str = "") -> None:
        self.id = gid
        self.addr = (ip, 52625)
        rng = SeededRng(f"gw:{gid}:{seed}")
        self.node = Node(
            private_key=generate_private_key(rng),
            rng=rng,
            now=now,
            unix_time=UNIX0 + now,
            is_client=False,
        )
        self.node.add_local_interface(self.addr, now)
        self.received: list[bytes] = []
        self.alive = True
        self.answers_ping = True  # as the gateway's kernel does for its own tunnel address
        self.tunnel_ip = "100.64.0.200"

    @property
    def public_key(self) -> str:
        return b64encode_key(self.node.public_key)

    def controls(self) -> list[tuple[int, dict]]:
        out = []
        for p in self.received:
            ctl = ipp.parse_p2p_control(p)
            if ctl is not None:
                out.append((ctl[0], json.loads(ctl[1])))
        return out

    def data(self) -> list[bytes]:
        return [p for p in self.received if ipp.parse_p2p_control(p) is None and not is_ping(p)]

    def pings(self) -> list[bytes]:
        return [p for p in self.received if is_ping(p)]


class World:
    def __init__(self, *, seed: str = "client") -> None:
        self.now = 0.0
        self.client = ClientState(
            private_key=generate_private_key(SeededRng(seed)),
            rng=SeededRng(seed),
            now=0.0,
            unix_time=UNIX0,
        )
        self.client.add_local_interface(CLIENT_ADDR, 0.0)
        self.gateways: dict[str, FakeGateway] = {}
        self.requests: list[tuple[float, dict]] = []
        self.portal_msgs: list[tuple[str, dict]] = []
        self.events: list[Any] = []
        self.tun: list[bytes] = []
        self.ice: dict[str, tuple[dict, dict]] = {}

    # portal side
    def portal(self, event: str, payload: Any) -> None:
        self.client.handle_portal_message(event, payload, self.now)
        self.pump()

    def init(self, resources: list[dict], **iface: Any) -> None:
        interface = {
            "ipv4": CLIENT_V4,
            "ipv6": CLIENT_V6,
            "search_domain": "corp.test",
            "upstream_dns": [{"protocol": "ip_port", "address": "192.0.2.53:53"}],
        }
        interface.update(iface)
        self.portal("init", {"interface": interface, "resources": resources, "relays": []})

    def add_gateway(self, gid: str, ip: str) -> FakeGateway:
        g = self.gateways[gid] = FakeGateway(gid, ip, self.now)
        return g

    def authorize(self, rid: str, gid: str, **extra: Any) -> None:
        g = self.gateways[gid]
        n = len(self.ice)
        cice = {"username": f"c{n:03d}", "password": f"client-password-{n:06d}"}
        gice = {"username": f"g{n:03d}", "password": f"gateway-password-{n:06d}"}
        self.ice[gid] = (cice, gice)
        psk = b64key(f"psk:{gid}")
        g.node.upsert_connection(
            CLIENT_ID,
            peer_public_key=self.client.public_key,
            preshared_key=b64decode_key(psk),
            local_creds=(gice["username"], gice["password"]),
            remote_creds=(cice["username"], cice["password"]),
            now=self.now,
        )
        payload = {
            "resource_id": rid,
            "site_id": SITE["id"],
            "gateway_id": gid,
            "gateway_public_key": g.public_key,
            "gateway_ipv4": g.tunnel_ip,
            "gateway_ipv6": "fd00:2021:1111::c8",
            "preshared_key": psk,
            "client_ice_credentials": cice,
            "gateway_ice_credentials": gice,
        }
        payload.update(extra)
        self.portal("authorization_created", payload)

    def deny(self, rid: str, reason: str = "forbidden", violated: list[str] | None = None) -> None:
        payload: dict[str, Any] = {"resource_id": rid, "reason": reason}
        if violated is not None:
            payload["violated_properties"] = violated
        self.portal("authorization_creation_failed", payload)

    # application side
    def send(self, packet: bytes) -> None:
        self.client.handle_tun_packet(packet, self.now)
        self.pump()

    def dns(self, name: str, rdtype: str = "A") -> dns.message.Message:
        q = dns.message.make_query(name, rdtype)
        r = self.client.handle_dns_query(
            q.to_wire(), sentinel="100.100.111.1", tcp=False, now=self.now
        )
        self.pump()
        return dns.message.from_wire(r.data)

    def reply(self, gid: str, packet: bytes) -> None:
        g = self.gateways[gid]
        t = g.node.encapsulate(CLIENT_ID, packet, self.now)
        if t is not None:
            self._to_client(t)
        self.pump()

    def _to_client(self, t: Any) -> None:
        self.client.handle_datagram(t.dst, t.src, t.payload, self.now)

    def pump(self) -> None:
        c = self.client
        for _ in range(10_000):
            moved = False
            while (t := c.poll_transmit()) is not None:
                moved = True
                for g in self.gateways.values():
                    if g.addr == t.dst and g.alive:
                        got = g.node.handle_datagram(t.dst, t.src, t.payload, self.now)
                        if got is not None:
                            g.received.append(bytes(got[1]))
                            echo = echo_reply_for(bytes(got[1]), g.tunnel_ip)
                            if echo is not None and g.answers_ping:
                                t2 = g.node.encapsulate(CLIENT_ID, echo, self.now)
                                if t2 is not None:
                                    self._to_client(t2)
            for g in self.gateways.values():
                while (ev := g.node.poll_event()) is not None:
                    moved = True
                    if isinstance(ev, NewIceCandidate):
                        c.handle_portal_message(
                            "ice_candidates", {"gateway_id": g.id, "candidates": [ev.sdp]}, self.now
                        )
                while (t := g.node.poll_transmit()) is not None:
                    moved = True
                    if g.alive:
                        self._to_client(t)
            while (m := c.poll_portal_message()) is not None:
                moved = True
                event, payload = m
                self.portal_msgs.append(m)
                if event == "request_authorization":
                    self.requests.append((self.now, payload))
                elif event == "new_ice_candidates":
                    g2 = self.gateways.get(payload["gateway_id"])
                    if g2 is not None:
                        for sdp in payload["candidates"]:
                            g2.node.add_remote_candidate(CLIENT_ID, sdp, self.now)
            while (ev := c.poll_event()) is not None:
                moved = True
                self.events.append(ev)
            while (p := c.poll_tun_packet()) is not None:
                moved = True
                self.tun.append(p)
            if not moved:
                return
        raise AssertionError("the world never went quiet")

    def advance(self, dt: float) -> None:
        end = self.now + dt
        for _ in range(100_000):
            self.pump()
            ts = [
                t
                for t in [
                    self.client.poll_timeout(),
                    *(g.node.poll_timeout() for g in self.gateways.values()),
                ]
                if t is not None
            ]
            t = min(ts, default=None)
            if t is None or t > end:
                break
            self.now = max(self.now, t)
            self.client.handle_timeout(self.now)
            for g in self.gateways.values():
                g.node.handle_timeout(self.now)
        self.now = end
        self.pump()

    def of(self, cls: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, cls)]

    def connected(self, gid: str) -> bool:
        return any(isinstance(e, ConnectionUp) and e.gateway_id == gid for e in self.events)


CIDR = resource("r-cidr", "cidr", "198.51.100.0/24", name="Private net")
HOST = resource("r-host", "cidr", "198.51.100.7/32", name="One host")
V6NET = resource("r-v6", "cidr", "2001:db8:51::/64")
DNSRES = resource("r-dns", "dns", "**.httpbin.test", name="httpbin")
INTERNET = {
    "id": "r-internet",
    "type": "internet",
    "name": "Internet",
    "can_be_disabled": True,
    "sites": [{"id": "site-internet", "name": "Internet"}],
}


def connected_world(*resources: dict) -> tuple[World, FakeGateway]:
    w = World()
    w.init(list(resources) or [CIDR])
    gw = w.add_gateway("gw-1", "198.51.100.250")
    return w, gw


# --- init and routes --------------------------------------------------------------------------------


def test_init_reports_routes_dns_and_resources():
    w = World()
    w.init([CIDR, V6NET, DNSRES, INTERNET])
    [tun] = w.of(TunInterfaceUpdated)
    assert tun.ipv4 == CLIENT_V4 and tun.ipv6 == CLIENT_V6
    assert tun.search_domain == "corp.test"
    for r in (
        "100.64.0.0/11",
        "fd00:2021:1111::/107",
        "100.96.0.0/11",
        "fd00:2021:1111:8000::/107",
        "100.100.111.0/24",
        "fd00:2021:1111:8000:100:100:111:0/120",
        "198.51.100.0/24",
        "2001:db8:51::/64",
        f"{CLIENT_V4}/32",
    ):
        assert r in tun.routes
    # The Internet resource is off by default.
    assert "0.0.0.0/0" not in tun.routes and "::/0" not in tun.routes
    assert tun.dns_sentinels and tun.dns_sentinels[0] == "100.100.111.1"
    [changed] = w.of(ResourcesChanged)
    assert {r.id for r in changed.resources} == {"r-cidr", "r-v6", "r-dns", "r-internet"}


def test_unknown_resource_types_are_ignored():
    w = World()
    w.init([CIDR, {"id": "x", "type": "static_device_pool", "name": "pool", "devices": []}])
    assert [r["id"] for r in w.client.status()["resources"]] == ["r-cidr"]
    assert w.client.stats_counters["resource_unknown_type"] == 1


def test_resource_created_adds_a_route_and_deleted_removes_it():
    w = World()
    w.init([CIDR])
    w.portal("resource_created_or_updated", V6NET)
    assert "2001:db8:51::/64" in w.of(TunInterfaceUpdated)[-1].routes
    w.portal("resource_deleted", "r-v6")
    routes = w.of(TunInterfaceUpdated)[-1].routes
    assert "2001:db8:51::/64" not in routes and "198.51.100.0/24" in routes
    assert len(w.of(TunInterfaceUpdated)) == 3


def test_malformed_portal_messages_are_dropped_not_raised():
    w = World()
    w.init([CIDR])
    for event, payload in [
        ("init", {"interface": "nope"}),
        ("resource_created_or_updated", {"type": "cidr"}),
        ("resource_created_or_updated", resource("bad", "cidr", "not-a-net")),
        ("authorization_created", {"resource_id": "r-cidr"}),
        ("authorization_creation_failed", {}),
        ("ice_candidates", None),
        ("relays_presence", {"connected": [{"id": "r", "addr": "x"}]}),
        ("no_such_event", {}),
    ]:
        w.portal(event, payload)
    assert w.client.stats_counters["portal_malformed"] >= 5
    assert w.client.stats_counters["portal_unknown_event"] == 1
    assert [r["id"] for r in w.client.status()["resources"]] == ["r-cidr"]


def test_relays_from_init_start_allocations():
    w = World()
    relay = {
        "id": "relay-1",
        "type": "turn",
        "addr": "203.0.113.101:3478",
        "username": "1900000000:salt",
        "password": "pw",
        "expires_at": 1900000000,
    }
    w.client.handle_portal_message(
        "init", {"interface": {"ipv4": CLIENT_V4}, "resources": [], "relays": [relay]}, 0.0
    )
    dsts = []
    while (t := w.client.poll_transmit()) is not None:
        dsts.append(t.dst)
    assert ("203.0.113.101", 3478) in dsts
    assert w.client.status()["relays"] == ["relay-1"]
    w.client.handle_portal_message(
        "relays_presence", {"disconnected_ids": ["relay-1"], "connected": []}, 1.0
    )
    assert w.client.status()["relays"] == []


# --- authorization on the first packet ----------------------------------------------------------------


def test_packets_to_non_resources_are_dropped():
    w, _ = connected_world(CIDR)
    w.send(udp4("192.0.2.99"))
    w.send(udp4("100.64.0.77"))  # another device's tunnel IP: not a resource
    w.send(b"\x00garbage")
    assert w.requests == []
    assert w.client.poll_transmit() is None
    assert w.client.stats_counters["tun_no_resource"] == 2
    assert w.client.stats_counters["tun_not_ip"] == 1


def test_first_packet_requests_authorization_at_most_every_two_seconds():
    w, _ = connected_world(CIDR)
    for i in range(5):
        w.send(udp4("198.51.100.7", i))
    assert [p for _, p in w.requests] == [{"resource_id": "r-cidr", "connected_gateway_ids": []}]
    w.advance(AUTHORIZATION_INTERVAL - 0.1)
    w.send(udp4("198.51.100.7", 5))
    assert len(w.requests) == 1
    w.advance(0.2)
    w.send(udp4("198.51.100.7", 6))
    assert len(w.requests) == 2
    assert w.client.status()["resources"][0]["status"] == "authorizing"


def test_buffered_packets_are_flushed_once_connected_in_order():
    w, gw = connected_world(CIDR)
    for i in range(3):
        w.send(udp4("198.51.100.7", i))
    w.authorize("r-cidr", "gw-1")
    assert gw.data() == []  # nothing leaves before the tunnel exists
    w.advance(2.0)
    assert w.connected("gw-1")
    assert [seq_of(p) for p in gw.data()] == [0, 1, 2]
    # Later packets go straight through; replies reach the TUN.
    w.send(udp4("198.51.100.7", 3))
    assert [seq_of(p) for p in gw.data()] == [0, 1, 2, 3]
    w.reply("gw-1", udp4(CLIENT_V4, 99, src="198.51.100.7"))
    assert [seq_of(p) for p in w.tun] == [99]
    assert w.client.status()["resources"][0]["status"] == "online"


def test_buffer_is_bounded_oldest_dropped():
    w, gw = connected_world(CIDR)
    n = MAX_BUFFERED_PER_RESOURCE + 20
    for i in range(n):
        w.send(udp4("198.51.100.7", i))
    w.authorize("r-cidr", "gw-1")
    w.advance(2.0)
    assert [seq_of(p) for p in gw.data()] == list(range(20, n))


def test_second_resource_on_a_connected_gateway_is_sent_at_once():
    w, gw = connected_world(CIDR, V6NET)
    w.send(udp4("198.51.100.7", 1))
    w.authorize("r-cidr", "gw-1")
    w.advance(2.0)
    w.send(udp6("2001:db8:51::5", 2))
    assert w.requests[-1][1] == {"resource_id": "r-v6", "connected_gateway_ids": ["gw-1"]}
    w.authorize("r-v6", "gw-1")
    assert [seq_of(p) for p in gw.data()] == [1, 2]
    assert len(w.of(ConnectionUp)) == 1


def test_longest_prefix_wins_for_overlapping_cidrs():
    w = World()
    w.init([CIDR, HOST])
    w.send(udp4("198.51.100.7"))
    w.send(udp4("198.51.100.8"))
    assert [p["resource_id"] for _, p in w.requests] == ["r-host", "r-cidr"]


# --- denial --------------------------------------------------------------------------------------------


def test_forbidden_reports_violated_properties_and_answers_queued_packets_with_icmp():
    w, _ = connected_world(CIDR)
    sent = [udp4("198.51.100.7", i) for i in range(3)]
    for p in sent:
        w.send(p)
    w.deny("r-cidr", violated=["remote_ip_location_region", "current_utc_datetime"])
    [denied] = w.of(AccessDenied)
    assert denied == AccessDenied(
        "r-cidr", "forbidden", ("remote_ip_location_region", "current_utc_datetime")
    )
    assert len(w.tun) == 3
    for reply, original in zip(w.tun, sent, strict=True):
        itype, code, quoted = icmp_error(reply)
        assert (itype, code) == (3, 13)
        assert quoted == original[: len(quoted)] and len(quoted) >= 28
        assert dst_of(reply) == CLIENT_V4
    st = w.client.status()["resources"][0]
    assert st["status"] == "forbidden" and st["violated_properties"] == [
        "remote_ip_location_region",
        "current_utc_datetime",
    ]
    # Within 2 s further packets are refused at once; afterwards the client asks again.
    w.send(udp4("198.51.100.7", 9))
    assert len(w.tun) == 4 and len(w.requests) == 1
    w.advance(AUTHORIZATION_INTERVAL)
    w.send(udp4("198.51.100.7", 10))
    assert len(w.requests) == 2 and len(w.tun) == 4


def test_offline_site_answers_with_host_unreachable():
    w, _ = connected_world(V6NET)
    w.send(udp6("2001:db8:51::5"))
    w.deny("r-v6", reason="offline")
    [reply] = w.tun
    itype, _code, _ = icmp_error(reply)
    assert itype == 1  # ICMPv6 destination unreachable
    assert w.of(AccessDenied)[0].reason == "offline"


# --- resource removal ------------------------------------------------------------------------------------


def test_resource_deleted_drops_the_connection_intent():
    w, gw = connected_world(CIDR)
    w.send(udp4("198.51.100.7", 1))
    w.authorize("r-cidr", "gw-1")
    w.advance(2.0)
    assert w.connected("gw-1")
    w.portal("resource_deleted", "r-cidr")
    assert "198.51.100.0/24" not in w.of(TunInterfaceUpdated)[-1].routes
    assert w.of(ConnectionDown)[-1].gateway_id == "gw-1"
    assert w.client.status()["connections"] == []
    n = len(gw.received)
    w.send(udp4("198.51.100.7", 2))
    assert len(gw.received) == n and len(w.requests) == 1


def test_resource_address_change_needs_a_new_authorization():
    w, gw = connected_world(CIDR)
    w.send(udp4("198.51.100.7", 1))
    w.authorize("r-cidr", "gw-1")
    w.advance(2.0)
    w.portal("resource_created_or_updated", resource("r-cidr", "cidr", "198.51.101.0/24"))
    w.advance(AUTHORIZATION_INTERVAL)
    w.send(udp4("198.51.101.1", 2))
    assert w.requests[-1][1]["resource_id"] == "r-cidr" and len(w.requests) == 2
    assert [seq_of(p) for p in gw.data()] == [1]


# --- ICMP prohibited from the gateway ---------------------------------------------------------------------


def test_icmp_prohibited_from_the_gateway_requests_authorization_again():
    w, gw = connected_world(CIDR)
    first = udp4("198.51.100.7", 1)
    w.send(first)
    w.authorize("r-cidr", "gw-1")
    w.advance(AUTHORIZATION_INTERVAL + 1)
    w.reply("gw-1", icmp4_prohibited(first, src=gw.tunnel_ip))
    assert len(w.requests) == 2
    assert w.requests[-1][1] == {"resource_id": "r-cidr", "connected_gateway_ids": ["gw-1"]}
    assert icmp_error(w.tun[-1])[:2] == (3, 13)  # the application sees the error too
    # Still rate limited.
    w.reply("gw-1", icmp4_prohibited(first, src=gw.tunnel_ip))
    assert len(w.requests) == 2


# --- DNS resources ---------------------------------------------------------------------------------------


def proxy_ips(answer: dns.message.Message) -> list[str]:
    return [rr.address for rrset in answer.answer for rr in rrset]


def test_dns_resource_assigned_ips_until_domain_status():
    w, gw = connected_world(DNSRES)
    ips = proxy_ips(w.dns("api.httpbin.test"))
    assert len(ips) == 4 and all(
        ipaddress.ip_address(i) in ipaddress.ip_network("100.96.0.0/11") for i in ips
    )
    w.send(udp4(ips[0], 1))
    assert [p["resource_id"] for _, p in w.requests] == ["r-dns"]
    w.authorize("r-dns", "gw-1")
    w.advance(1.0)
    assert w.connected("gw-1")
    # The gateway learns the name first; the data waits for its answer.
    ctl = gw.controls()
    assert ctl and ctl[0][0] == ipp.P2P_ASSIGNED_IPS
    assert ctl[0][1]["resource"] == "r-dns" and ctl[0][1]["domain"] == "api.httpbin.test"
    assert set(ips) <= set(ctl[0][1]["proxy_ips"])
    assert gw.data() == []
    for i in range(2, MAX_BUFFERED_PER_DOMAIN + 10):
        w.send(udp4(ips[0], i))
    w.advance(ASSIGNED_IPS_INTERVAL * 2)
    assert len(gw.controls()) == 3  # resent every 2 s
    status = json.dumps(
        {"resource": "r-dns", "domain": "api.httpbin.test", "status": "active"}
    ).encode()
    w.reply("gw-1", ipp.build_p2p_control(ipp.P2P_DOMAIN_STATUS, status))
    seqs = [seq_of(p) for p in gw.data()]
    assert len(seqs) == MAX_BUFFERED_PER_DOMAIN and seqs[-1] == MAX_BUFFERED_PER_DOMAIN + 9
    assert w.tun == []  # control packets are not for the applications
    w.advance(ASSIGNED_IPS_INTERVAL * 3)
    assert len(gw.controls()) == 3  # answered: no more resends
    w.send(udp4(ips[1], 500))
    assert seq_of(gw.data()[-1]) == 500
    # A re-query tells the gateway again.
    w.dns("api.httpbin.test")
    assert len(gw.controls()) == 4


def test_dns_non_resource_is_forwarded():
    w, _ = connected_world(DNSRES)
    q = dns.message.make_query("example.org", "A")
    r = w.client.handle_dns_query(q.to_wire(), sentinel="100.100.111.1", tcp=False, now=w.now)
    assert r.upstream == ("192.0.2.53", 53)
    assert r.data == q.to_wire()


# --- failover --------------------------------------------------------------------------------------------


def test_silent_gateway_is_replaced():
    w, gw1 = connected_world(CIDR)
    gw2 = w.add_gateway("gw-2", "198.51.100.251")
    w.send(udp4("198.51.100.7", 1))
    w.authorize("r-cidr", "gw-1")
    w.advance(2.0)
    assert w.connected("gw-1")
    w.reply("gw-1", udp4(CLIENT_V4, 7, src="198.51.100.7"))
    gw1.alive = False
    t0 = w.now
    w.send(udp4("198.51.100.7", 2))
    w.advance(GATEWAY_SILENT_TIMEOUT - 0.5)
    assert w.of(GatewaySilent) == []
    w.advance(1.0)
    [silent] = w.of(GatewaySilent)
    assert silent.gateway_id == "gw-1" and silent.resource_ids == ("r-cidr",)
    at, req = w.requests[-1]
    assert req == {"resource_id": "r-cidr", "connected_gateway_ids": []}
    assert at - t0 == pytest.approx(GATEWAY_SILENT_TIMEOUT, abs=0.01)
    # Packets meanwhile wait for the new gateway.
    w.send(udp4("198.51.100.7", 3))
    w.authorize("r-cidr", "gw-2")
    w.advance(2.0)
    assert w.connected("gw-2")
    assert [seq_of(p) for p in gw2.data()] == [3]
    assert [c["gateway_id"] for c in w.client.status()["connections"]] == ["gw-2"]


def test_an_answering_gateway_is_not_silent():
    w, gw = connected_world(CIDR)
    w.send(udp4("198.51.100.7", 1))
    w.authorize("r-cidr", "gw-1")
    w.advance(2.0)
    for i in range(30):
        w.send(udp4("198.51.100.7", 10 + i))
        w.advance(0.5)
        w.reply("gw-1", udp4(CLIENT_V4, i, src="198.51.100.7"))
    # One-way traffic: the gateway's WireGuard keepalive counts as an answer.
    w.send(udp4("198.51.100.7", 99))
    w.advance(GATEWAY_SILENT_TIMEOUT / 2)
    w.send(udp4("198.51.100.7", 100))
    w.advance(GATEWAY_SILENT_TIMEOUT * 2)
    assert w.of(GatewaySilent) == []
    assert w.of(ConnectionDown) == []
    # The liveness probe went to the gateway's own tunnel address; its answer never reaches the TUN.
    assert gw.pings() and all(dst_of(p) == gw.tunnel_ip for p in gw.pings())
    assert all(p[9] != 1 for p in w.tun)
    assert len(w.requests) == 1


def test_connection_failure_forgets_the_gateway_and_asks_again():
    w, gw = connected_world(CIDR)
    w.send(udp4("198.51.100.7", 1))
    w.authorize("r-cidr", "gw-1")
    w.advance(2.0)
    gw.alive = False
    w.send(udp4("198.51.100.7", 2))
    w.advance(60.0)
    assert w.of(ConnectionDown)[-1].gateway_id == "gw-1"
    assert w.client.status()["connections"] == []
    w.send(udp4("198.51.100.7", 3))
    assert w.requests[-1][1]["connected_gateway_ids"] == []


# --- Internet resource -----------------------------------------------------------------------------------


def test_internet_resource_toggle():
    w, gw = connected_world(CIDR, INTERNET)
    w.send(udp4("8.8.8.8", 1))
    assert w.requests == []
    assert w.client.resource_status("r-internet") == "off"
    w.client.set_internet_resource_enabled(True, w.now)
    assert w.client.resource_status("r-internet") == "idle"
    w.pump()
    assert {"0.0.0.0/0", "::/0"} <= set(w.of(TunInterfaceUpdated)[-1].routes)
    w.send(udp4("8.8.8.8", 2))
    w.send(udp4("198.51.100.7", 3))  # a more specific resource still wins
    assert [p["resource_id"] for _, p in w.requests] == ["r-internet", "r-cidr"]
    w.authorize("r-internet", "gw-1")
    w.advance(2.0)
    assert [seq_of(p) for p in gw.data()] == [2]
    assert w.client.status()["resources"][1]["status"] == "online"
    w.client.set_internet_resource_enabled(False, w.now)
    w.pump()
    assert "0.0.0.0/0" not in w.of(TunInterfaceUpdated)[-1].routes
    assert w.client.resource_status("r-internet") == "off"
    assert w.of(ConnectionDown)[-1].gateway_id == "gw-1"
    w.send(udp4("8.8.8.8", 4))
    assert len(w.requests) == 2


# --- status ----------------------------------------------------------------------------------------------


def test_status_lists_resources_and_connections():
    w, _gw = connected_world(CIDR, DNSRES)
    w.send(udp4("198.51.100.7", 1))
    w.authorize("r-cidr", "gw-1")
    w.advance(2.0)
    w.reply("gw-1", udp4(CLIENT_V4, 5, src="198.51.100.7"))
    st = w.client.status()
    json.dumps(st)  # what `fz client status --json` prints
    by_id = {r["id"]: r for r in st["resources"]}
    assert by_id["r-cidr"]["site"] == SITE and by_id["r-cidr"]["status"] == "online"
    assert (
        by_id["r-cidr"]["address"] == "198.51.100.0/24" and by_id["r-cidr"]["name"] == "Private net"
    )
    assert by_id["r-dns"]["status"] == "idle"
    [conn] = st["connections"]
    assert (
        conn["gateway_id"] == "gw-1" and conn["path"] == "direct" and conn["state"] == "connected"
    )
    assert conn["rx_bytes"] > 0 and conn["tx_bytes"] > 0 and conn["resources"] == ["r-cidr"]
    assert conn["rtt_ms"] is None or conn["rtt_ms"] >= 0
    assert st["interface"]["ipv4"] == CLIENT_V4 and st["internet_resource_enabled"] is False


# --- lifetime of an authorization --------------------------------------------------------------------


def test_expired_authorization_is_requested_again():
    w, gw = connected_world(CIDR)
    w.send(udp4("198.51.100.7", 1))
    w.authorize("r-cidr", "gw-1", expires_at=UNIX0 + 30)
    w.advance(2.0)
    w.send(udp4("198.51.100.7", 2))
    assert [seq_of(p) for p in gw.data()] == [1, 2]
    w.advance(30.0)
    # The gateway closes its side when the client has no authorization left there; so does the client.
    assert w.of(ConnectionDown)[-1] == ConnectionDown("gw-1", "authorizations expired")
    w.send(udp4("198.51.100.7", 3))
    assert len(w.requests) == 2
    assert [seq_of(p) for p in gw.data()] == [1, 2]  # held until authorized again
    w.authorize("r-cidr", "gw-1")
    w.advance(2.0)  # a fresh connection
    assert [seq_of(p) for p in gw.data()] == [1, 2, 3]


def test_portal_reconnect_keeps_established_connections():
    w, gw = connected_world(CIDR, V6NET)
    w.send(udp4("198.51.100.7", 1))
    w.authorize("r-cidr", "gw-1")
    w.advance(2.0)
    w.init([CIDR])  # the portal restarted; the IPv6 resource is gone meanwhile
    w.send(udp4("198.51.100.7", 2))
    assert [seq_of(p) for p in gw.data()] == [1, 2]
    assert len(w.requests) == 1
    assert "2001:db8:51::/64" not in w.of(TunInterfaceUpdated)[-1].routes
    assert w.of(ConnectionDown) == []


def test_gateway_with_a_new_key_is_connected_afresh():
    w, _ = connected_world(CIDR)
    w.send(udp4("198.51.100.7", 1))
    w.authorize("r-cidr", "gw-1")
    w.advance(2.0)
    # The gateway restarted: a new Node with a new key under the same id.
    w.gateways["gw-1"] = FakeGateway("gw-1", "198.51.100.250", w.now, seed="restarted")
    w.advance(AUTHORIZATION_INTERVAL)
    w.authorize("r-cidr", "gw-1")
    w.send(udp4("198.51.100.7", 2))
    w.advance(2.0)
    assert len(w.of(ConnectionUp)) == 2
    assert [seq_of(p) for p in w.gateways["gw-1"].data()] == [2]


def test_portal_disconnect_is_reported():
    w = World()
    w.init([CIDR])
    w.portal("disconnect", {"reason": "token_expired"})
    assert w.of(PortalDisconnect) == [PortalDisconnect("token_expired")]


def test_upstreams_fall_back_to_the_system_resolvers():
    w = World()
    w.init([DNSRES], upstream_dns=[])
    w.client.set_system_upstreams([("192.0.2.1", 53)], w.now)
    w.pump()
    assert w.of(TunInterfaceUpdated)[-1].dns_sentinels[0] == "100.100.111.1"
    q = dns.message.make_query("example.org", "A")
    r = w.client.handle_dns_query(q.to_wire(), sentinel="100.100.111.1", tcp=False, now=w.now)
    assert r.upstream == ("192.0.2.1", 53)


# --- robustness ----------------------------------------------------------------------------------------

_SHARED: list[tuple[World, FakeGateway]] = []


def _shared_world() -> tuple[World, FakeGateway]:
    if not _SHARED:
        w, gw = connected_world(CIDR, DNSRES, V6NET)
        w.send(udp4("198.51.100.7", 1))
        w.authorize("r-cidr", "gw-1")
        w.advance(2.0)
        _SHARED.append((w, gw))
    return _SHARED[0]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
EVENTS = [
    "init",
    "config_changed",
    "resource_created_or_updated",
    "resource_deleted",
    "relays_presence",
    "authorization_created",
    "authorization_creation_failed",
    "ice_candidates",
    "invalidate_ice_candidates",
    "disconnect",
]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    data=st.binary(max_size=120),
    prefix=st.sampled_from([b"", b"\x45", b"\x60", b"\x04\x00\x00\x00"]),
)
def test_garbage_from_the_tun_and_the_network_never_raises(data, prefix):
    w, _ = _shared_world()
    w.client.handle_tun_packet(prefix + data, w.now)
    w.client.handle_datagram(CLIENT_ADDR, ("198.51.100.250", 52625), prefix + data, w.now)
    w.client.handle_dns_query(prefix + data, sentinel="100.100.111.1", tcp=False, now=w.now)
    w.pump()


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(event=st.sampled_from(EVENTS), payload=json_values)
def test_arbitrary_portal_payloads_never_raise(event, payload):
    w = World()
    w.init([CIDR])
    w.client.handle_portal_message(event, payload, w.now)
    w.client.status()


def test_dns_query_for_an_online_resource_tells_the_gateway_at_once():
    w, gw = connected_world(DNSRES)
    ips = proxy_ips(w.dns("a.httpbin.test"))
    w.send(udp4(ips[0], 1))
    w.authorize("r-dns", "gw-1")
    w.advance(1.0)
    assert [c[1]["domain"] for c in gw.controls()] == ["a.httpbin.test"]
    w.dns("b.httpbin.test")  # another name of the same resource, before any packet to it
    assert [c[1]["domain"] for c in gw.controls()] == ["a.httpbin.test", "b.httpbin.test"]


# --- against the real gateway core --------------------------------------------------------------------


class CoreGateway(FakeGateway):
    """A gateway whose decisions are the real GatewayState; the resources behind it echo UDP."""

    def __init__(self, gid: str, ip: str, now: float, *, answer: list[str] | None) -> None:
        super().__init__(gid, ip, now)
        from firezone.proto.gateway import GatewayState

        self.state = GatewayState(now=now, unix_time=UNIX0 + now, rng=SeededRng(f"gs:{gid}"))
        self.answer = answer  # what this gateway's resolver says for every name
        self.to_resources: list[bytes] = []

    def authorize_client(self, client: ClientState, resource: dict, now: float) -> None:
        from firezone.proto.gateway import ClientInfo

        info = ClientInfo(CLIENT_ID, CLIENT_V4, CLIENT_V6, b64encode_key(client.public_key))
        self.state.add_authorization(info, resource, None, now)

    def deliver(self, packet: bytes, now: float) -> list[Any]:
        """A decrypted packet from the client; returns transmits for the client."""
        out = []
        fwd = self.state.handle_tunnel_packet(CLIENT_ID, packet, now)
        while (q := self.state.poll_dns_query()) is not None:
            self.state.handle_dns_result(q.id, self.answer, None, now)
        if fwd is not None:
            self.to_resources.append(fwd)
            if fwd[0] >> 4 == 4 and fwd[9] == 17:  # the resource echoes UDP back
                back = udp4(
                    dst_of_src(fwd), seq_of(fwd), src=dst_of(fwd), sport=5000, dport=udp_sport(fwd)
                )
                got = self.state.handle_tun_packet(back, now)
                if got is not None:
                    out.append(got[1])
        while (tp := self.state.poll_tunnel_packet()) is not None:
            out.append(tp[1])
        return [t for p in out if (t := self.node.encapsulate(CLIENT_ID, p, now)) is not None]


def dst_of_src(packet: bytes) -> str:
    return str(ipaddress.IPv4Address(packet[12:16]))


def udp_sport(packet: bytes) -> int:
    return int(struct.unpack_from("!H", packet, 20)[0])


class CoreWorld(World):
    def pump(self) -> None:
        # Route the client's datagrams through CoreGateway.deliver instead of recording them.
        c = self.client
        for _ in range(10_000):
            moved = False
            while (t := c.poll_transmit()) is not None:
                moved = True
                for g in self.gateways.values():
                    if g.addr == t.dst and g.alive:
                        got = g.node.handle_datagram(t.dst, t.src, t.payload, self.now)
                        if got is not None:
                            g.received.append(bytes(got[1]))
                            assert isinstance(g, CoreGateway)
                            for t2 in g.deliver(bytes(got[1]), self.now):
                                self._to_client(t2)
            for g in self.gateways.values():
                while (ev := g.node.poll_event()) is not None:
                    moved = True
                    if isinstance(ev, NewIceCandidate):
                        c.handle_portal_message(
                            "ice_candidates", {"gateway_id": g.id, "candidates": [ev.sdp]}, self.now
                        )
                while (t := g.node.poll_transmit()) is not None:
                    moved = True
                    if g.alive:
                        self._to_client(t)
            while (m := c.poll_portal_message()) is not None:
                moved = True
                self.portal_msgs.append(m)
                if m[0] == "request_authorization":
                    self.requests.append((self.now, m[1]))
                elif m[0] == "new_ice_candidates" and m[1]["gateway_id"] in self.gateways:
                    for sdp in m[1]["candidates"]:
                        self.gateways[m[1]["gateway_id"]].node.add_remote_candidate(
                            CLIENT_ID, sdp, self.now
                        )
            while (ev := c.poll_event()) is not None:
                moved = True
                self.events.append(ev)
            while (p := c.poll_tun_packet()) is not None:
                moved = True
                self.tun.append(p)
            if not moved:
                return
        raise AssertionError("the world never went quiet")


def core_world(res: dict, gw_resource: dict, answer: list[str] | None = None) -> tuple[World, Any]:
    w = CoreWorld()
    w.init([res])
    gw = w.gateways["gw-1"] = CoreGateway("gw-1", "198.51.100.250", w.now, answer=answer)
    gw.authorize_client(w.client, gw_resource, w.now)
    return w, gw


def test_with_the_gateway_core_filters_and_prohibited_answers():
    gw_res = {
        "id": "r-cidr",
        "type": "cidr",
        "name": "net",
        "address": "198.51.100.0/24",
        "filters": [{"protocol": "udp", "port_range_start": 5000, "port_range_end": 5000}],
    }
    w, gw = core_world(CIDR, gw_res)
    w.send(udp4("198.51.100.7", 1, dport=5000))
    w.authorize("r-cidr", "gw-1")
    w.advance(2.0)
    assert [seq_of(p) for p in gw.to_resources] == [1]
    assert [seq_of(p) for p in w.tun] == [1]  # echoed by the resource, back through the tunnel
    w.advance(AUTHORIZATION_INTERVAL)
    w.send(udp4("198.51.100.7", 2, dport=6000))  # not allowed by the filter
    itype, code, quoted = icmp_error(w.tun[-1])
    assert (itype, code) == (3, 13) and dst_of(quoted) == "198.51.100.7"
    assert len(w.requests) == 2  # prohibited -> authorization requested again


def test_with_the_gateway_core_dns_resource_end_to_end():
    gw_res = {"id": "r-dns", "type": "dns", "name": "httpbin", "address": "**.httpbin.test"}
    w, gw = core_world(DNSRES, gw_res, answer=["198.51.100.20"])
    ips = proxy_ips(w.dns("api.httpbin.test"))
    w.send(udp4(ips[0], 1, dport=5000))
    w.authorize("r-dns", "gw-1")
    w.advance(2.0)
    # AssignedIps -> the gateway resolves -> DomainStatus -> the held packet goes out NATed.
    assert [dst_of(p) for p in gw.to_resources] == ["198.51.100.20"]
    [reply] = w.tun
    assert seq_of(reply) == 1 and dst_of_src(reply) == ips[0]  # the client only sees proxy IPs
    w.send(udp4(ips[0], 2, dport=5000))
    assert [seq_of(p) for p in w.tun] == [1, 2]


def test_with_the_gateway_core_one_way_traffic_is_not_silence():
    w, gw = core_world(
        CIDR, {"id": "r-cidr", "type": "cidr", "name": "n", "address": "198.51.100.0/24"}
    )
    w.send(udp4("198.51.100.9", 1, dport=7))  # the resource behind .9 never answers (not UDP echo)
    w.authorize("r-cidr", "gw-1")
    w.advance(2.0)
    gw.deliver = lambda packet, now, _d=gw.deliver: [] if packet[9] == 17 else _d(packet, now)
    for i in range(40):
        w.send(udp4("198.51.100.9", 10 + i, dport=7))
        w.advance(1.0)
    assert w.of(GatewaySilent) == []
    assert w.client.stats_counters.get("probe_answered", 0) >= 1
    assert all(p[9] != 1 for p in w.tun)  # the probe's answer is not for the applications
    assert len(w.requests) == 1


def test_silent_gateway_is_left_out_of_connected_gateway_ids():
    w, gw1 = connected_world(CIDR, V6NET)
    w.add_gateway("gw-2", "198.51.100.251")
    w.send(udp4("198.51.100.7", 1))
    w.authorize("r-cidr", "gw-1")
    w.send(udp6("2001:db8:51::5", 2))
    w.authorize("r-v6", "gw-2")
    w.advance(2.0)
    assert w.connected("gw-1") and w.connected("gw-2")
    w.reply("gw-1", udp4(CLIENT_V4, 7, src="198.51.100.7"))
    w.reply("gw-2", udp6(CLIENT_V6, 8, src="2001:db8:51::5"))
    gw1.alive = False
    w.send(udp4("198.51.100.7", 3))
    w.advance(GATEWAY_SILENT_TIMEOUT + 0.5)
    assert [s.gateway_id for s in w.of(GatewaySilent)] == ["gw-1"]
    assert w.requests[-1][1] == {"resource_id": "r-cidr", "connected_gateway_ids": ["gw-2"]}
    assert gw1.pings() == []  # the probe could not get through either
