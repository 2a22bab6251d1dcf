"""Client and gateway agree on when a connection is over (found by test_client_gateway_model.py).

The gateway closes its connection to a client whose last authorization ran out (the role acts on
``ClientAccessEnded``). A client that kept its side of the connection re-used it after the portal
authorized the resource again: the ICE credentials are the same per client/gateway pair, so the
Node kept the old WireGuard session and the packets went into a tunnel the gateway no longer had.
The same happened when the last authorization on a gateway was refused on a re-request (the
portal saw the site offline) and the gateway later closed its side.
"""

from __future__ import annotations

from firezone.proto import ip as ipp
from firezone.proto.client import ConnectionDown, GatewaySilent
from tests.stateful.client_gateway_world import CLIENT_V4, SITE, World

NET = {
    "id": "r-net",
    "type": "cidr",
    "name": "net",
    "address": "198.51.100.0/24",
    "address_description": None,
    "filters": [],
    "sites": [SITE],
}


def _arrived(w: World) -> list[bytes]:
    out = []
    for _, raw in w.gateways["gw1"].to_resources:
        p = ipp.parse(raw)
        assert p is not None
        out.append(p.payload)
    return out


def test_packet_after_expiry_reaches_the_resource_once_over_a_fresh_connection():
    w = World(auth_ttl=30.0)
    w.put_resource(NET)
    w.set_policy("r-net", "allow")
    w.send(ipp.build_udp(CLIENT_V4, "198.51.100.7", 40000, 53, b"first"))
    w.advance(1.0)
    assert _arrived(w) == [b"first"]
    w.advance(29.5)  # past the expiry at 30 s: the gateway closed its side of the connection
    assert w.gateways["gw1"].connection_closes == [30.0]
    w.send(ipp.build_udp(CLIENT_V4, "198.51.100.7", 40000, 53, b"second"))
    w.advance(1.0)
    assert _arrived(w) == [b"first", b"second"]
    assert [p["resource_id"] for _, p in w.requests] == ["r-net", "r-net"]
    # The client closed its side at the expiry too, so the new authorization got a new tunnel.
    assert ConnectionDown("gw1", "authorizations expired") in w.events


def test_expiry_keeps_a_connection_other_authorizations_still_use():
    w = World(auth_ttl=30.0)
    w.put_resource(NET)
    w.put_resource({**NET, "id": "r-host", "address": "198.51.100.7/32"})
    w.set_policy("r-net", "allow")
    w.set_policy("r-host", "allow")
    w.send(ipp.build_udp(CLIENT_V4, "198.51.100.20", 40000, 53, b"net"))
    w.advance(10.0)
    w.send(ipp.build_udp(CLIENT_V4, "198.51.100.7", 40000, 53, b"host"))
    w.advance(25.0)  # r-net expired at 30 s, r-host (authorized at 10 s) has not
    assert w.gateways["gw1"].connection_closes == []
    assert not any(isinstance(e, ConnectionDown) for e in w.events)
    w.send(ipp.build_udp(CLIENT_V4, "198.51.100.7", 40000, 53, b"host again"))
    assert _arrived(w) == [b"net", b"host", b"host again"]


def test_denied_while_online_then_expired_reconnects_when_granted_again():
    # The portal briefly sees no gateway of the site: a re-request (after the gateway refused a
    # packet its filter does not allow) is answered "offline". The gateway still holds the
    # authorization until it expires, then closes its side; the next grant needs a new tunnel.
    w = World(auth_ttl=30.0)
    w.put_resource(
        {**NET, "filters": [{"protocol": "udp", "port_range_start": 53, "port_range_end": 53}]}
    )
    w.set_policy("r-net", "allow")
    w.send(ipp.build_udp(CLIENT_V4, "198.51.100.7", 40000, 53, b"allowed"))
    w.advance(3.0)  # past the 2 s between two requests for one resource
    w.site_online = False
    w.send(ipp.build_tcp(CLIENT_V4, "198.51.100.7", 40000, 80, b"refused"))
    w.answer_portal()
    assert [d for _, _, d in w.decisions] == ["allow", "offline"]
    w.site_online = True
    w.advance(28.0)  # the gateway's authorization ran out at 30 s: it closed its side
    assert w.gateways["gw1"].connection_closes == [30.0]
    w.send(ipp.build_udp(CLIENT_V4, "198.51.100.7", 40000, 53, b"again"))
    w.advance(1.0)
    assert _arrived(w) == [b"allowed", b"again"]
    # The refusal left the connection without authorizations: the new one did not reuse it.
    assert ConnectionDown("gw1", "stale") in w.events


def test_no_silent_gateway_after_the_last_resource_on_it_was_denied_and_deleted():
    w = World()
    udp53 = [{"protocol": "udp", "port_range_start": 53, "port_range_end": 53}]
    w.put_resource({**NET, "filters": udp53})
    w.set_policy("r-net", "allow")
    w.send(ipp.build_udp(CLIENT_V4, "198.51.100.7", 40000, 53, b"one"))
    w.advance(3.0)
    w.site_online = False
    w.send(ipp.build_tcp(CLIENT_V4, "198.51.100.7", 40000, 80, b"refused"))  # asks again
    w.send(ipp.build_udp(CLIENT_V4, "198.51.100.7", 40000, 53, b"two"))  # never answered
    w.answer_portal()  # "offline"
    w.set_policy("r-net", None)  # resource_deleted; reject_access: the gateway closes its side
    w.advance(20.0)
    assert _arrived(w) == [b"one", b"two"]
    assert not [e for e in w.events if isinstance(e, GatewaySilent)]
