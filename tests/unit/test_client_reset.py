"""ClientState.reset: a network change closes every connection and reconnects what was in use.

The world of test_client_state (real gateway Nodes, instant delivery, fake portal) is reused; the
client's address change is modelled by the new socket base given to ``reset`` and by the gateway
seeing the client's datagrams come from that address.
"""

from __future__ import annotations

from typing import Any

from firezone.proto.client import (
    AUTHORIZATION_INTERVAL,
    ConnectionDown,
    ConnectionUp,
    TunInterfaceUpdated,
)
from tests.unit.test_client_state import (
    CIDR,
    CLIENT_ADDR,
    CLIENT_V4,
    DNSRES,
    HOST,
    World,
    connected_world,
    seq_of,
    udp4,
)

NEW_ADDR = ("192.0.2.12", 52625)
RELAY = {
    "id": "relay-1",
    "type": "turn",
    "addr": "203.0.113.101:3478",
    "username": "1900000000:salt",
    "password": "pw",
}


class RoamingWorld(World):
    """Datagrams from the client leave from its current address (the socket is bound to any)."""

    def __init__(self) -> None:
        super().__init__()
        self.client_addr = CLIENT_ADDR
        self.sent: list[Any] = []
        self.candidates_reach_gateway = True

    def pump(self) -> None:
        c = self.client
        real = c.poll_transmit

        def poll() -> Any:
            t = real()
            if t is not None:
                self.sent.append(t)
                t = type(t)(self.client_addr, t.dst, t.payload)
            return t

        real_msg = c.poll_portal_message

        def poll_msg() -> Any:
            while (m := real_msg()) is not None:
                if m[0] != "new_ice_candidates" or self.candidates_reach_gateway:
                    return m
                self.portal_msgs.append(m)
            return None

        c.poll_transmit = poll  # type: ignore[method-assign]
        c.poll_portal_message = poll_msg  # type: ignore[method-assign]
        try:
            super().pump()
        finally:
            del c.poll_transmit
            del c.poll_portal_message

    def _to_client(self, t: Any) -> None:
        if t.dst == self.client_addr:
            self.client.handle_datagram(t.dst, t.src, t.payload, self.now)

    def authorize_same_credentials(self, rid: str, gid: str) -> None:
        """What the real portal does: ICE credentials are the same for the pair every time."""
        if gid in self.ice:
            cice, gice = self.ice[gid]
            payload = {
                "resource_id": rid,
                "site_id": "site-1",
                "gateway_id": gid,
                "gateway_public_key": self.gateways[gid].public_key,
                "gateway_ipv4": self.gateways[gid].tunnel_ip,
                "gateway_ipv6": "fd00:2021:1111::c8",
                "preshared_key": _psk(gid),
                "client_ice_credentials": cice,
                "gateway_ice_credentials": gice,
            }
            self.portal("authorization_created", payload)
        else:
            self.authorize(rid, gid)


def _psk(gid: str) -> str:
    from tests.unit.test_client_state import b64key

    return b64key(f"psk:{gid}")


def roaming_world(*resources: dict) -> RoamingWorld:
    w = RoamingWorld()
    w.init(list(resources) or [CIDR])
    w.add_gateway("gw-1", "198.51.100.250")
    return w


def test_reset_closes_connections_and_asks_again_at_once():
    w = roaming_world(CIDR)
    gw = w.gateways["gw-1"]
    w.send(udp4("198.51.100.7", 1))
    w.authorize_same_credentials("r-cidr", "gw-1")
    w.advance(2.0)
    assert w.connected("gw-1")
    tun_events = len(w.of(TunInterfaceUpdated))

    w.client_addr = NEW_ADDR
    w.client.reset(w.now, [NEW_ADDR])
    w.pump()
    assert w.of(ConnectionDown)[-1] == ConnectionDown("gw-1", "network changed")
    assert w.client.status()["connections"] == []
    # Asked for again without waiting for the application (a download only receives) and
    # without the 2 s spacing of requests; the gateway in use is no longer "connected".
    assert len(w.requests) == 2
    assert w.requests[-1] == (w.now, {"resource_id": "r-cidr", "connected_gateway_ids": []})
    # The interface (routes, DNS) is untouched.
    assert len(w.of(TunInterfaceUpdated)) == tun_events

    w.send(udp4("198.51.100.7", 2))  # held until the new connection is up
    w.authorize_same_credentials("r-cidr", "gw-1")
    w.advance(2.0)
    assert len(w.of(ConnectionUp)) == 2
    assert [seq_of(p) for p in gw.data()] == [1, 2]
    st = w.client.status()
    [conn] = st["connections"]
    assert conn["state"] == "connected" and conn["gateway_id"] == "gw-1"
    assert gw.node.stats("client-1")["remote"] == NEW_ADDR
    # Replies reach the application through the new path.
    w.reply("gw-1", udp4(CLIENT_V4, 42, src="198.51.100.7"))
    assert [seq_of(p) for p in w.tun] == [42]


def test_reset_signals_only_candidates_of_the_new_address():
    w = roaming_world(CIDR)
    w.send(udp4("198.51.100.7", 1))
    w.authorize_same_credentials("r-cidr", "gw-1")
    w.advance(2.0)
    w.client.reset(w.now, [NEW_ADDR])
    w.pump()
    n = len(w.portal_msgs)
    w.authorize_same_credentials("r-cidr", "gw-1")
    signalled = [c for e, p in w.portal_msgs[n:] if e == "new_ice_candidates" for c in p["candidates"]]
    assert signalled and all("192.0.2.12" in c for c in signalled), signalled
    assert not any("192.0.2.10" in c for c in signalled)


def test_reset_idle_resources_are_not_requested():
    w = roaming_world(CIDR, HOST)
    w.client.reset(w.now, [NEW_ADDR])
    w.pump()
    assert w.requests == [] and w.of(ConnectionDown) == []


def test_reset_lets_a_denied_resource_ask_again_at_once():
    w = roaming_world(CIDR)
    w.send(udp4("198.51.100.7", 1))
    w.deny("r-cidr", "forbidden", ["remote_ip"])
    w.advance(0.5)
    w.client.reset(w.now, [NEW_ADDR])
    w.pump()
    assert len(w.requests) == 1  # denied is not "in use"
    w.send(udp4("198.51.100.7", 2))  # but the next packet may ask, the 2 s spacing aside
    assert len(w.requests) == 2
    assert w.now - w.requests[0][0] < AUTHORIZATION_INTERVAL


def test_reset_makes_new_relay_allocations():
    w = RoamingWorld()
    w.client.handle_portal_message(
        "init", {"interface": {"ipv4": CLIENT_V4}, "resources": [CIDR], "relays": [RELAY]}, 0.0
    )
    first = []
    while (t := w.client.poll_transmit()) is not None:
        first.append(t)
    assert [t.dst for t in first] == [("203.0.113.101", 3478)]
    w.client.reset(1.0, [NEW_ADDR])
    after = []
    while (t := w.client.poll_transmit()) is not None:
        after.append(t)
    # A fresh Allocate (the old one had no credentials yet, so there was nothing to free).
    assert [t.dst for t in after] == [("203.0.113.101", 3478)]
    assert after[-1].payload[:2] == b"\x00\x03"  # STUN Allocate request
    assert after[-1].payload[8:20] != first[0].payload[8:20]
    assert w.client.status()["relays"] == ["relay-1"]


def test_reset_with_a_dns_resource_sends_assigned_ips_again():
    w = roaming_world(DNSRES)
    gw = w.gateways["gw-1"]
    answer = w.dns("dns.httpbin.test")
    proxy = str(answer.answer[0][0])
    w.send(udp4(proxy, 1))
    w.authorize_same_credentials("r-dns", "gw-1")
    w.advance(2.0)
    assert [c[1]["domain"] for c in gw.controls()][:1] == ["dns.httpbin.test"]
    w.client_addr = NEW_ADDR
    w.client.reset(w.now, [NEW_ADDR])
    w.pump()
    before = len(gw.controls())
    w.send(udp4(proxy, 2))
    w.authorize_same_credentials("r-dns", "gw-1")
    w.advance(1.0)
    assert len(w.of(ConnectionUp)) == 2
    # The new tunnel tells the gateway the name's proxy IPs again.
    assert [c[1]["domain"] for c in gw.controls()[before:]] == ["dns.httpbin.test"]


def test_reset_without_interfaces_keeps_the_current_ones():
    w, _ = connected_world(CIDR)
    w.send(udp4("198.51.100.7", 1))
    w.authorize("r-cidr", "gw-1")
    w.advance(2.0)
    n = len(w.portal_msgs)
    w.client.reset(w.now)
    w.pump()
    w.authorize("r-cidr", "gw-1")
    w.advance(2.0)
    assert len(w.of(ConnectionUp)) == 2
    signalled = [c for e, p in w.portal_msgs[n:] if e == "new_ice_candidates" for c in p["candidates"]]
    assert signalled and all("192.0.2.10" in c for c in signalled), signalled


def test_reset_reuses_the_candidates_a_gateway_signalled_before():
    """The gateway keeps its side (same ICE credentials from the portal) and signals nothing new;
    here it cannot reach the client's new address either, so only the client's checks to the
    candidates it remembers can connect."""
    w = roaming_world(CIDR)
    gw = w.gateways["gw-1"]
    w.send(udp4("198.51.100.7", 1))
    w.authorize_same_credentials("r-cidr", "gw-1")
    w.advance(2.0)
    assert w.connected("gw-1")
    w.client_addr = NEW_ADDR
    w.candidates_reach_gateway = False
    w.client.reset(w.now, [NEW_ADDR])
    w.pump()
    w.authorize_same_credentials("r-cidr", "gw-1")
    w.send(udp4("198.51.100.7", 2))
    w.advance(3.0)
    assert len(w.of(ConnectionUp)) == 2
    assert [seq_of(p) for p in gw.data()] == [1, 2]


def test_a_restarted_gateways_old_candidates_are_not_reused():
    w = roaming_world(CIDR)
    w.send(udp4("198.51.100.7", 1))
    w.authorize_same_credentials("r-cidr", "gw-1")
    w.advance(2.0)
    w.client.reset(w.now, [NEW_ADDR])
    w.pump()
    # Same id, new key, new address: whatever it signalled before is stale.
    from tests.unit.test_client_state import FakeGateway

    w.gateways["gw-1"] = FakeGateway("gw-1", "198.51.100.251", w.now, seed="restarted")
    w.candidates_reach_gateway = False
    w.ice.pop("gw-1")
    w.authorize("r-cidr", "gw-1")
    assert w.client._node.stats("gw-1")  # connection exists
    remote = w.client._node._conns["gw-1"].remote  # what the agent was given
    assert ("198.51.100.250", 52625) not in remote
