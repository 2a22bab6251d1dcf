"""One ClientState and its gateways (GatewayState + Node each) wired in memory, with a fake portal.

The tunnel is real: the client's and every gateway's :class:`~firezone.proto.node.Node` run ICE
(host candidates) and WireGuard over an instant, lossless in-memory network. Each gateway host is
glued the way ``firezone.roles.gateway`` glues it: every packet its Node decrypts goes through
``GatewayState.handle_tunnel_packet`` and whatever comes out is "written to the TUN", i.e. recorded
in :attr:`GatewayHost.to_resources` (arrived on the resource network); replies from a resource are
fed to ``handle_tun_packet`` and encrypted back; ``ClientAccessEnded`` closes the client's
connection; DNS queries are answered by the world's :attr:`World.records` at once.

The portal is played by :class:`World` too, with the rules the real one follows: a resource is
shown to the client only while a policy covers it; removing the policy (or the resource) sends
``resource_deleted`` to the client and ``reject_access`` to the gateway holding an authorization;
a filter change sends ``resource_created_or_updated`` to the client and ``resource_updated`` to that
gateway. ``request_authorization`` is queued (an authorization in flight) and answered by
:meth:`World.answer_portal` (also called before time moves): ``not_found`` without a policy,
``forbidden`` for a policy whose conditions do not hold, ``offline`` while the portal sees no
gateway of the site (:attr:`World.site_online`), else ``create_authorization`` on the gateway and
``authorization_created`` to the client, valid for :attr:`World.auth_ttl` seconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import dns.message

from firezone.proto import ip as ipp
from firezone.proto.client import ClientState
from firezone.proto.dns.stub import Answer, Forward, StubResult
from firezone.proto.gateway import ClientAccessEnded, ClientInfo, GatewayState
from firezone.proto.node import ConnectionFailed, NewIceCandidate, Node
from firezone.proto.rng import SeededRng
from firezone.proto.wireguard import b64decode_key, b64encode_key, generate_private_key

UNIX0 = 1_800_000_000.0
CLIENT_ID = "client-1"
CLIENT_ADDR = ("192.0.2.10", 52625)
CLIENT_V4 = "100.64.0.10"
CLIENT_V6 = "fd00:2021:1111::a"
SITE = {"id": "site-1", "name": "HQ"}
UPSTREAM = ("192.0.2.53", 53)
SENTINEL = "100.100.111.1"


@dataclass
class Grant:
    """One authorization the portal made."""

    at: float
    resource_id: str
    gateway_id: str
    expires_at: float  # UNIX seconds


@dataclass
class GatewayHost:
    """A gateway machine: Node + GatewayState, its TUN output and what its resolver was asked."""

    id: str
    addr: tuple[str, int]
    tunnel_v4: str
    tunnel_v6: str
    node: Node
    state: GatewayState
    to_resources: list[tuple[float, bytes]] = field(default_factory=list)
    assigned: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    dns_queries: list[tuple[float, str]] = field(default_factory=list)
    connection_closes: list[float] = field(default_factory=list)

    @property
    def public_key(self) -> str:
        return b64encode_key(self.node.public_key)


def ice_credentials(gid: str) -> tuple[dict[str, str], dict[str, str]]:
    """Deterministic per client/gateway pair, as the real portal derives them."""
    return (
        {"username": f"c{gid[-1]}x", "password": f"client-password-for-{gid}"},
        {"username": f"g{gid[-1]}x", "password": f"gateway-password-for-{gid}"},
    )


class World:
    def __init__(self, *, seed: int = 0, gateways: int = 1, auth_ttl: float = 90.0) -> None:
        self.now = 0.0
        self.auth_ttl = auth_ttl
        rng = SeededRng(f"client:{seed}")
        self.client = ClientState(
            private_key=generate_private_key(rng), rng=rng, now=0.0, unix_time=UNIX0
        )
        self.client.add_local_interface(CLIENT_ADDR, 0.0)
        self.gateways: dict[str, GatewayHost] = {}
        for i in range(gateways):
            gid = f"gw{i + 1}"
            grng = SeededRng(f"gw:{seed}:{gid}")
            node = Node(
                private_key=generate_private_key(grng),
                rng=grng,
                now=0.0,
                unix_time=UNIX0,
                is_client=False,
            )
            addr = (f"198.18.0.{10 + i}", 52625)
            node.add_local_interface(addr, 0.0)
            state = GatewayState(now=0.0, unix_time=UNIX0, rng=SeededRng(f"gws:{seed}:{gid}"))
            self.gateways[gid] = GatewayHost(
                gid, addr, f"100.64.0.{200 + i}", f"fd00:2021:1111::{200 + i:x}", node, state
            )
        self.gateway_order = sorted(self.gateways)
        # resolver on the gateways' side: name -> addresses
        self.records: dict[str, list[str]] = {}
        # portal
        self.resources: dict[str, dict[str, Any]] = {}
        self.policies: dict[str, str] = {}  # resource id -> "allow" | "forbidden"
        self.visible: dict[str, dict[str, Any]] = {}
        self.authorizations: dict[str, Grant] = {}
        self.grants: list[Grant] = []
        self.requests: list[tuple[float, dict[str, Any]]] = []
        self.pending_requests: list[dict[str, Any]] = []
        self.denials: list[tuple[float, str, str]] = []
        # Every answer to request_authorization in order: (time, resource id, "allow" or a reason).
        self.decisions: list[tuple[float, str, str]] = []
        # Whether the portal sees a gateway of the site online (else requests fail "offline").
        self.site_online = True
        # client outputs
        self.events: list[Any] = []
        self.to_app: list[tuple[float, bytes]] = []
        self.client.handle_portal_message(
            "init",
            {
                "interface": {
                    "ipv4": CLIENT_V4,
                    "ipv6": CLIENT_V6,
                    "search_domain": None,
                    "upstream_dns": [
                        {"protocol": "ip_port", "address": f"{UPSTREAM[0]}:{UPSTREAM[1]}"}
                    ],
                },
                "resources": [],
                "relays": [],
            },
            0.0,
        )
        self.pump()

    # --- portal -------------------------------------------------------------------------------------
    @staticmethod
    def _gateway_view(r: dict[str, Any]) -> dict[str, Any]:
        return {k: r[k] for k in ("id", "type", "name", "address", "filters") if k in r}

    def _refresh(self, rid: str) -> None:
        """Push the client's view of ``rid`` after a resource or policy change."""
        r = self.resources.get(rid)
        show = r is not None and rid in self.policies
        if show:
            assert r is not None
            if self.visible.get(rid) != r:
                self.visible[rid] = dict(r)
                self.client.handle_portal_message("resource_created_or_updated", dict(r), self.now)
        elif rid in self.visible:
            del self.visible[rid]
            self.client.handle_portal_message("resource_deleted", rid, self.now)
            self._revoke(rid)
        self.pump()

    def _revoke(self, rid: str) -> None:
        grant = self.authorizations.pop(rid, None)
        if grant is not None:
            g = self.gateways[grant.gateway_id]
            g.state.remove_authorization(CLIENT_ID, rid, self.now)

    def put_resource(self, r: dict[str, Any]) -> None:
        """Create or update a resource (address, type and site never change for one id here)."""
        old = self.resources.get(r["id"])
        self.resources[r["id"]] = dict(r)
        grant = self.authorizations.get(r["id"])
        if old is not None and grant is not None and old["filters"] != r["filters"]:
            self.gateways[grant.gateway_id].state.update_resource(self._gateway_view(r), self.now)
        self._refresh(r["id"])

    def delete_resource(self, rid: str) -> None:
        self.resources.pop(rid, None)
        self._refresh(rid)

    def set_policy(self, rid: str, kind: str | None) -> None:
        if kind is None:
            self.policies.pop(rid, None)
        else:
            self.policies[rid] = kind
        self._refresh(rid)

    def answer_portal(self) -> None:
        """The portal answers every request_authorization in flight."""
        while self.pending_requests:
            p = self.pending_requests.pop(0)
            rid = p["resource_id"]
            if rid not in self.visible:
                self._deny(rid, "not_found")
            elif self.policies[rid] == "forbidden":
                self._deny(rid, "forbidden", ["remote_ip"])
            elif not self.site_online:
                self._deny(rid, "offline")
            else:
                self._authorize(rid, p.get("connected_gateway_ids") or [])
            self.pump()

    def _deny(self, rid: str, reason: str, violated: list[str] | None = None) -> None:
        self.denials.append((self.now, rid, reason))
        self.decisions.append((self.now, rid, reason))
        payload: dict[str, Any] = {"resource_id": rid, "reason": reason}
        if violated:
            payload["violated_properties"] = violated
        self.client.handle_portal_message("authorization_creation_failed", payload, self.now)

    def _authorize(self, rid: str, connected: list[str]) -> None:
        preferred = [g for g in self.gateway_order if g in connected]
        gid = (preferred or self.gateway_order)[0]
        g = self.gateways[gid]
        r = self.resources[rid]
        exp = UNIX0 + self.now + self.auth_ttl
        cice, gice = ice_credentials(gid)
        psk = b64encode_key(SeededRng(f"psk:{gid}").token_bytes(32))
        # create_authorization on the gateway, as firezone.roles.gateway handles it
        info = ClientInfo(
            CLIENT_ID, CLIENT_V4, CLIENT_V6, public_key=b64encode_key(self.client.public_key)
        )
        g.state.add_authorization(info, self._gateway_view(r), exp, self.now)
        g.node.upsert_connection(
            CLIENT_ID,
            peer_public_key=self.client.public_key,
            preshared_key=b64decode_key(psk),
            local_creds=(gice["username"], gice["password"]),
            remote_creds=(cice["username"], cice["password"]),
            now=self.now,
        )
        grant = Grant(self.now, rid, gid, exp)
        self.grants.append(grant)
        self.decisions.append((self.now, rid, "allow"))
        self.authorizations[rid] = grant
        # As in the real exchange, the gateway's candidates (drained by the next pump) reach the
        # client after authorization_created: the gateway answers the portal first.
        self.client.handle_portal_message(
            "authorization_created",
            {
                "resource_id": rid,
                "site_id": SITE["id"],
                "gateway_id": gid,
                "gateway_public_key": g.public_key,
                "gateway_ipv4": g.tunnel_v4,
                "gateway_ipv6": g.tunnel_v6,
                "preshared_key": psk,
                "client_ice_credentials": cice,
                "gateway_ice_credentials": gice,
                "expires_at": exp,
            },
            self.now,
        )

    # --- application side ---------------------------------------------------------------------------
    def send(self, packet: bytes) -> None:
        self.client.handle_tun_packet(packet, self.now)
        self.pump()

    def dns(self, name: str, rdtype: str) -> StubResult:
        q = dns.message.make_query(name, rdtype)
        r = self.client.handle_dns_query(q.to_wire(), sentinel=SENTINEL, tcp=False, now=self.now)
        self.pump()
        assert isinstance(r, Answer | Forward), r
        return r

    def resource_reply(self, gid: str, packet: bytes) -> None:
        """A resource answers: the packet reaches the gateway's TUN."""
        g = self.gateways[gid]
        got = g.state.handle_tun_packet(packet, self.now)
        if got is not None:
            t = g.node.encapsulate(got[0], got[1], self.now)
            if t is not None:
                self.client.handle_datagram(t.dst, t.src, t.payload, self.now)
        self.pump()

    # --- the in-memory network ------------------------------------------------------------------------
    def _gateway_rx(self, g: GatewayHost, cid: str, packet: bytes) -> None:
        ctl = ipp.parse_p2p_control(packet)
        if ctl is not None and ctl[0] == ipp.P2P_ASSIGNED_IPS:
            g.assigned.append((self.now, json.loads(ctl[1])))
        out = g.state.handle_tunnel_packet(cid, packet, self.now)
        if out is not None:
            g.to_resources.append((self.now, bytes(out)))

    def _drain_gateway(self, g: GatewayHost) -> bool:
        moved = False
        st, node = g.state, g.node
        while (tp := st.poll_tunnel_packet()) is not None:
            moved = True
            t = node.encapsulate(tp[0], tp[1], self.now)
            if t is not None:
                self.client.handle_datagram(t.dst, t.src, t.payload, self.now)
        while (q := st.poll_dns_query()) is not None:
            moved = True
            g.dns_queries.append((self.now, q.domain))
            st.handle_dns_result(q.id, self.records.get(q.domain) or None, None, self.now)
        while (ev := st.poll_event()) is not None:
            if isinstance(ev, ClientAccessEnded):
                moved = True
                g.connection_closes.append(self.now)
                node.remove_connection(ev.client_id, self.now)
                st.remove_client(ev.client_id, self.now)
        while (nev := node.poll_event()) is not None:
            moved = True
            if isinstance(nev, NewIceCandidate):
                self.client.handle_portal_message(
                    "ice_candidates", {"gateway_id": g.id, "candidates": [nev.sdp]}, self.now
                )
            elif isinstance(nev, ConnectionFailed):
                st.remove_client(nev.peer_id, self.now)
        while (t := node.poll_transmit()) is not None:
            moved = True
            self.client.handle_datagram(t.dst, t.src, t.payload, self.now)
        return moved

    def pump(self) -> None:
        c = self.client
        by_addr = {g.addr: g for g in self.gateways.values()}
        for _ in range(10_000):
            moved = False
            while (t := c.poll_transmit()) is not None:
                moved = True
                g = by_addr.get(t.dst)
                if g is not None:
                    got = g.node.handle_datagram(t.dst, t.src, t.payload, self.now)
                    if got is not None:
                        self._gateway_rx(g, got[0], bytes(got[1]))
            for g in self.gateways.values():
                moved = self._drain_gateway(g) or moved
            while (m := c.poll_portal_message()) is not None:
                moved = True
                event, payload = m
                if event == "request_authorization":
                    self.requests.append((self.now, payload))
                    self.pending_requests.append(payload)
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
                self.to_app.append((self.now, p))
            if not moved:
                return
        raise AssertionError("the world never went quiet")

    def _deadlines(self) -> list[float]:
        ts = [self.client.poll_timeout()]
        for g in self.gateways.values():
            ts += [g.node.poll_timeout(), g.state.poll_timeout()]
        return [t for t in ts if t is not None]

    def advance(self, dt: float) -> None:
        """Move time forward by ``dt``, firing every deadline on the way (as the drivers do)."""
        self.answer_portal()
        end = self.now + dt
        for _ in range(100_000):
            self.pump()
            t = min(self._deadlines(), default=None)
            if t is None or t > end:
                break
            self.now = max(self.now, t)
            self.client.handle_timeout(self.now)
            for g in self.gateways.values():
                g.node.handle_timeout(self.now)
                g.state.handle_timeout(self.now)
            self.answer_portal()
        else:
            raise AssertionError("time never reached the end of the step")
        self.now = end
        self.pump()
        self.answer_portal()
