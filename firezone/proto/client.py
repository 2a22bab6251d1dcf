"""The client's sans-IO core: resources, routes, DNS, authorizations and gateway connections.

Theory of operation
-------------------
A :class:`ClientState` is everything ``fz client up`` decides. The role feeds it decoded portal
messages (:meth:`~ClientState.handle_portal_message`), IP packets the applications wrote to the
TUN device (:meth:`~ClientState.handle_tun_packet`), UDP datagrams (:meth:`~ClientState.handle_datagram`)
and DNS queries that reached the sentinel addresses (:meth:`~ClientState.handle_dns_query`); it pulls
portal messages, TUN packets, datagrams and events out with the ``poll_*`` methods. It owns one
:class:`~firezone.proto.node.Node` (ICE + TURN + WireGuard to every gateway) and one
:class:`~firezone.proto.dns.stub.DnsStub`, and drains both inside its own ``handle_*`` calls.

The portal's ``init`` gives the interface (tunnel IPs, search domain, upstream resolvers), the
resources and the relays. Routes are the tunnel, proxy and sentinel ranges plus every CIDR resource;
the Internet resource adds ``0.0.0.0/0`` and ``::/0`` only while the user has it enabled (off by
default). Every change of those is reported as one :class:`TunInterfaceUpdated`.

A packet from the TUN is routed by its destination: a proxy IP (a DNS resource name the stub
answered), else the longest CIDR prefix, else the Internet resource if enabled; anything else is
dropped and counted. Per resource the access moves through::

    NONE --packet--> AUTHORIZING (packets buffered, request_authorization at most once per 2 s)
    AUTHORIZING --authorization_created--> CONNECTING (Node connection to the gateway)
    AUTHORIZING --authorization_creation_failed--> DENIED (AccessDenied; buffered packets answered
                with ICMP "administratively prohibited" / "host unreachable")
    CONNECTING  --ConnectionEstablished--> ONLINE (buffered packets flushed through WireGuard)
    ONLINE      --gateway silent 10 s--> AUTHORIZING (asks again; the silent gateway is left out of
                connected_gateway_ids so the portal prefers another one of the site)
    ONLINE      --ICMP prohibited from the gateway--> ONLINE + a new request_authorization
    any         --connection failed / resource deleted / authorization expired--> NONE
                (at expiry, a timer; the gateway closes its side once the client has no
                authorization left there, so the client closes that connection too)
    AUTHORIZING, CONNECTING, ONLINE --reset() (network changed)--> AUTHORIZING (asked for again
                at once; every connection and relay allocation is made afresh from the new address)

DNS resources (firezone-notes §3.5): the stub answers A/AAAA with proxy IPs. A packet to a proxy IP
authorizes the resource like any other; once the tunnel to its gateway is up the client sends the
p2p control message ``AssignedIps {resource, domain, proxy_ips}`` through it, every 2 s until the
gateway answers ``DomainStatus``, holding at most 32 packets for that name meanwhile. A re-query of
the name sends ``AssignedIps`` again (the gateway re-resolves).

A network change (:meth:`~ClientState.reset`) replaces the Node: every gateway connection and
relay allocation is made again from the new address, and the resources in use are asked for at
once. The portal's ICE credentials are fixed per client/gateway pair, so a gateway that kept its
side of the connection answers the new authorization without signalling its candidates again;
the client therefore remembers what each gateway signalled (per gateway key) and gives it to
every new connection to that gateway.

"Silent" means: we sent the gateway something and nothing at all (data, keepalive, handshake) came
back for ``GATEWAY_SILENT_TIMEOUT``; an idle connection is never silent. A live gateway that only
receives (one-way UDP) would send its WireGuard keepalive about 10 s after our first packet, too
late, so after ``LIVENESS_PROBE_AFTER`` without an answer the client sends one ICMP echo request
to the gateway's own tunnel address; any answer to it (echo reply or an ICMP error) proves the
gateway alive and is consumed, never shown to the applications.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from firezone.logs import TRACE
from firezone.proto import ip as ipp
from firezone.proto.dns.stub import DnsStub, DomainResolved, StubResult
from firezone.proto.ice import Transmit
from firezone.proto.node import (
    ConnectionClosed,
    ConnectionEstablished,
    ConnectionFailed,
    InvalidateIceCandidate,
    NewIceCandidate,
    Node,
    PathChanged,
    RelayInfo,
)
from firezone.proto.rng import Rng
from firezone.proto.wireguard.keys import b64decode_key

__all__ = [
    "ASSIGNED_IPS_INTERVAL",
    "AUTHORIZATION_INTERVAL",
    "GATEWAY_SILENT_TIMEOUT",
    "LIVENESS_PROBE_AFTER",
    "AccessDenied",
    "ClientEvent",
    "ClientState",
    "ConnectionDown",
    "ConnectionPathChanged",
    "ConnectionUp",
    "GatewaySilent",
    "PortalDisconnect",
    "ResourceInfo",
    "ResourcesChanged",
    "TunInterfaceUpdated",
]

log = logging.getLogger(__name__)

Addr = tuple[str, int]

# firezone-notes §3.1: tunnel, DNS proxy and sentinel ranges (all routed into the TUN).
IPV4_TUNNEL = ipaddress.ip_network("100.64.0.0/11")
IPV6_TUNNEL = ipaddress.ip_network("fd00:2021:1111::/107")
IPV4_PROXY = ipaddress.ip_network("100.96.0.0/11")
IPV6_PROXY = ipaddress.ip_network("fd00:2021:1111:8000::/107")
IPV4_SENTINELS = ipaddress.ip_network("100.100.111.0/24")
IPV6_SENTINELS = ipaddress.ip_network("fd00:2021:1111:8000:100:100:111:0/120")
INTERNET_ROUTES = ("0.0.0.0/0", "::/0")

# Firezone pending_authorizations.rs: at most one request per resource every 2 s.
AUTHORIZATION_INTERVAL = 2.0
# Packets held per resource while it is being authorized and connected (oldest dropped first);
# the Node's own connecting buffer has the same size.
MAX_BUFFERED_PER_RESOURCE = 128
# Firezone dns_resource_nat.rs: AssignedIps resent every 2 s until DomainStatus; 32 packets held.
ASSIGNED_IPS_INTERVAL = 2.0
MAX_BUFFERED_PER_DOMAIN = 32
# Firezone critical sequences, "Automatic failover": existing connections are rerouted within 10 s.
# Calling a gateway dead after 8 s of silence leaves 2 s to authorize and connect to another one.
GATEWAY_SILENT_TIMEOUT = 8.0
# Half the budget: the probe's answer has the other half (any sane RTT) to arrive.
LIVENESS_PROBE_AFTER = 4.0
# ICMP echo identifier of our liveness probes ("fz").
PROBE_ICMP_ID = 0x667A
# Candidates remembered per gateway (a gateway signals a handful: host, srflx, relays per family).
MAX_REMEMBERED_CANDIDATES = 64
# Destination -> resource lookups remembered (cleared whenever resources or routes change).
_ROUTE_CACHE_MAX = 4096

# Access states of one resource.
NONE, AUTHORIZING, CONNECTING, ONLINE, DENIED = (
    "none",
    "authorizing",
    "connecting",
    "online",
    "denied",
)
_RESOURCE_TYPES = ("cidr", "ip", "dns", "internet")
_PROXY4 = (int(IPV4_PROXY.network_address), int(IPV4_PROXY.netmask))
_PROXY6 = (int(IPV6_PROXY.network_address), int(IPV6_PROXY.netmask))


# --- events ----------------------------------------------------------------------------------------


class ClientEvent:
    """Base class of everything :meth:`ClientState.poll_event` returns."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class TunInterfaceUpdated(ClientEvent):
    """The TUN device's addresses, routes and DNS setup changed; the role applies all of it."""

    ipv4: str | None
    ipv6: str | None
    routes: tuple[str, ...]
    dns_sentinels: tuple[str, ...]
    search_domain: str | None

    def __post_init__(self) -> None:
        for r in self.routes:
            ipaddress.ip_network(r)  # raises ValueError for a malformed route


@dataclass(frozen=True, slots=True)
class ResourceInfo:
    """One resource as the portal described it."""

    id: str
    type: str
    name: str
    address: str | None
    address_description: str | None
    site_id: str | None
    site_name: str | None

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("resource id must be non-empty")
        if self.type not in _RESOURCE_TYPES:
            raise ValueError(f"unknown resource type {self.type!r}")


@dataclass(frozen=True, slots=True)
class ResourcesChanged(ClientEvent):
    """The set of resources (or one of them) changed."""

    resources: tuple[ResourceInfo, ...]


@dataclass(frozen=True, slots=True)
class AccessDenied(ClientEvent):
    """The portal refused access to a resource, with the policy conditions that did not hold."""

    resource_id: str
    reason: str
    violated_properties: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ConnectionUp(ClientEvent):
    """The tunnel to a gateway is up."""

    gateway_id: str
    path: str
    rtt: float | None


@dataclass(frozen=True, slots=True)
class ConnectionPathChanged(ClientEvent):
    """An established gateway connection moved to another path (direct / relayed)."""

    gateway_id: str
    path: str
    rtt: float | None


@dataclass(frozen=True, slots=True)
class ConnectionDown(ClientEvent):
    """The connection to a gateway is gone."""

    gateway_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class GatewaySilent(ClientEvent):
    """A gateway stopped answering; its resources are being authorized again."""

    gateway_id: str
    resource_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PortalDisconnect(ClientEvent):
    """The portal ended the session (``token_expired``, ``certificate_revoked`` ...)."""

    reason: str


# --- internal state ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Resource:
    info: ResourceInfo
    net: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    raw: dict[str, Any]


@dataclass(slots=True)
class _Access:
    """What the client knows about reaching one resource."""

    resource_id: str
    state: str = NONE
    gateway_id: str | None = None
    expires_at: float | None = None  # unix seconds
    last_request: float | None = None
    buffer: deque[bytes] = field(default_factory=deque)
    dropped: int = 0
    denied_reason: str | None = None
    violated: tuple[str, ...] = ()


@dataclass(slots=True)
class _Domain:
    """One DNS-resource name whose proxy IPs a gateway must learn (p2p AssignedIps)."""

    resource_id: str
    domain: str
    proxy_ips: list[str]
    active: bool = False  # the gateway answered DomainStatus once: packets flow
    resend_at: float | None = None  # AssignedIps not yet answered: next retransmission
    buffer: deque[bytes] = field(default_factory=lambda: deque(maxlen=MAX_BUFFERED_PER_DOMAIN))


@dataclass(slots=True)
class _Gateway:
    id: str
    site_id: str | None
    public_key: bytes
    ipv4: str | None
    ipv6: str | None
    connected: bool = False
    path: str | None = None
    rtt: float | None = None
    silent: bool = False
    unanswered_since: float | None = None
    rx_mark: int = 0
    probe_at: float | None = None
    probes: int = 0
    resources: set[str] = field(default_factory=set)
    domains: dict[str, _Domain] = field(default_factory=dict)


def _parse_hostport(text: str) -> Addr:
    """``"1.2.3.4:53"`` / ``"[2001:db8::1]:53"`` / a bare IP (port 53)."""
    return ipp.parse_hostport(text)


def _relay_infos(entries: Any) -> list[tuple[str, RelayInfo]]:
    """Relay JSON -> (portal relay id, RelayInfo); one relay may come once per address family."""
    out: list[tuple[str, RelayInfo]] = []
    for e in entries or []:
        if not isinstance(e, dict) or e.get("type", "turn") != "turn":
            continue
        try:
            rid = str(e["id"])
            addr = _parse_hostport(str(e["addr"]))
            fam = "6" if ":" in addr[0] else "4"
            # The Node keys relays by id; the v4 and v6 entries of one relay are separate servers.
            out.append(
                (rid, RelayInfo(f"{rid}/v{fam}", addr, str(e["username"]), str(e["password"])))
            )
        except (KeyError, ValueError, TypeError):
            log.debug("malformed relay entry dropped")
    return out


def _dst_of(packet: bytes) -> tuple[int, int] | None:
    """(IP version, destination as int) without a full parse; None if not an IP packet."""
    n = len(packet)
    if n >= 20 and packet[0] >> 4 == 4:
        return 4, int.from_bytes(packet[16:20], "big")
    if n >= 40 and packet[0] >> 4 == 6:
        return 6, int.from_bytes(packet[24:40], "big")
    return None


def _is_probe_answer(p: bytes) -> bool:
    """An echo reply to our probe, or an ICMP error quoting one."""
    if len(p) >= 28 and p[0] >> 4 == 4 and p[9] == 1:
        off = (p[0] & 0x0F) * 4
        if p[off] == 0:
            return p[off + 4 : off + 6] == PROBE_ICMP_ID.to_bytes(2, "big")
        q = off + 8  # the quoted header of an error
        if p[off] in (3, 11) and len(p) >= q + 28 and p[q] >> 4 == 4 and p[q + 9] == 1:
            qo = q + (p[q] & 0x0F) * 4
            return p[qo] == 8 and p[qo + 4 : qo + 6] == PROBE_ICMP_ID.to_bytes(2, "big")
        return False
    if len(p) >= 48 and p[0] >> 4 == 6 and p[6] == 58:
        if p[40] == 129:
            return p[44:46] == PROBE_ICMP_ID.to_bytes(2, "big")
        if p[40] in (1, 3) and len(p) >= 96 and p[48 + 6] == 58:
            return p[88] == 128 and p[92:94] == PROBE_ICMP_ID.to_bytes(2, "big")
    return False


def _ip_str(version: int, value: int) -> str:
    if version == 4:
        return str(ipaddress.IPv4Address(value))
    return str(ipaddress.IPv6Address(value))


class ClientState:
    """Everything ``fz client up`` decides; see the module docstring."""

    def __init__(
        self,
        *,
        private_key: bytes,
        rng: Rng,
        now: float,
        unix_time: float,
        node_factory: Any = Node,
        dns_factory: Any = DnsStub,
    ) -> None:
        self._node_factory = node_factory
        self._private_key = private_key
        self._rng = rng
        self._node: Node = node_factory(
            private_key=private_key, rng=rng, now=now, unix_time=unix_time, is_client=True
        )
        self._interfaces: dict[int, Addr] = {}
        self.public_key: bytes = self._node.public_key
        self._dns: DnsStub = dns_factory()
        self._unix_offset = unix_time - now
        self._now = now
        self._ipv4: str | None = None
        self._ipv6: str | None = None
        self._search_domain: str | None = None
        self._portal_upstreams: list[Addr] = []
        self._system_upstreams: list[Addr] = []
        self._sentinels: tuple[str, ...] = ()
        self._resources: dict[str, _Resource] = {}
        self._access: dict[str, _Access] = {}
        self._gateways: dict[str, _Gateway] = {}
        self._relays: dict[str, list[RelayInfo]] = {}
        # The candidates each gateway signalled, with the key they belong to: see
        # _on_authorization_created.
        self._remote_candidates: dict[str, tuple[bytes, dict[str, None]]] = {}
        self._internet_enabled = False
        # CIDR resources, longest prefix first: (version, network int, mask int, prefixlen, id).
        self._cidrs: list[tuple[int, int, int, int, str]] = []
        self._route_cache: dict[tuple[int, int], str | None] = {}
        self._last_tun: TunInterfaceUpdated | None = None
        self._initialized = False
        self._portal_out: deque[tuple[str, dict[str, Any]]] = deque()
        self._tun_out: deque[bytes] = deque()
        self._transmits: deque[Transmit] = deque()
        self._events: deque[ClientEvent] = deque()
        self.stats_counters: dict[str, int] = {}

    # --- small helpers ------------------------------------------------------------------------------
    def _count(self, what: str) -> None:
        self.stats_counters[what] = self.stats_counters.get(what, 0) + 1

    def _tick(self, now: float) -> None:
        self._now = max(self._now, now)

    def _unix(self, now: float) -> float:
        return self._unix_offset + now

    # --- inputs from the role -------------------------------------------------------------------------
    def add_local_interface(self, addr: Addr, now: float) -> None:
        """The UDP socket of one address family (its bound address is a host candidate)."""
        self._tick(now)
        self._interfaces[6 if ":" in addr[0] else 4] = addr
        self._node.add_local_interface(addr, now)
        self._drain_node(now)

    def reset(self, now: float, local_interfaces: list[Addr] | None = None) -> None:
        """The network changed: every gateway connection and relay allocation starts afresh.

        ``local_interfaces`` are the socket bases from now on (one per family; a family left out
        is no longer used); None keeps the current ones. Resources that were being authorized,
        connected or used are asked for again at once: a download only receives, and its
        application may not send anything that would trigger a new authorization otherwise.
        """
        self._tick(now)
        old = self._node
        # Free the old allocations (TURN Refresh, lifetime 0); from a new address the relay
        # refuses, and the allocation times out there instead.
        old.update_relays([], now)
        while (t := old.poll_transmit()) is not None:
            self._transmits.append(t)
        if local_interfaces is not None:
            self._interfaces = {6 if ":" in a[0] else 4: a for a in local_interfaces}
        self._node = self._node_factory(
            private_key=self._private_key,
            rng=self._rng,
            now=now,
            unix_time=self._unix(now),
            is_client=True,
        )
        gateways = list(self._gateways.values())
        self._gateways.clear()
        log.debug("network reset", extra={"connections": len(gateways)})
        for g in gateways:
            self._events.append(ConnectionDown(g.id, "network changed"))
        for acc in self._access.values():
            was = acc.state in (AUTHORIZING, CONNECTING, ONLINE)
            if acc.gateway_id is not None:
                for g in gateways:
                    if g.id == acc.gateway_id:
                        for d in [d for d in g.domains.values() if d.resource_id == acc.resource_id]:
                            acc.buffer.extend(d.buffer)
                acc.gateway_id = None
                acc.expires_at = None
            # The portal may decide differently on the new network (remote-IP conditions).
            acc.last_request = None
            if was:
                acc.state = NONE
                self._request(acc, now, force=True)
        for addr in self._interfaces.values():
            self._node.add_local_interface(addr, now)
        self._node.update_relays([i for infos in self._relays.values() for i in infos], now)
        self._drain_node(now)

    def set_system_upstreams(self, upstreams: list[Addr], now: float) -> None:
        """The resolvers the system used before us; used when the portal configures none."""
        self._tick(now)
        self._system_upstreams = list(upstreams)
        self._apply_upstreams()
        self._emit_interface()

    def set_internet_resource_enabled(self, on: bool, now: float) -> None:
        """Route everything through the Internet resource (``fz client internet on|off``)."""
        self._tick(now)
        if on == self._internet_enabled:
            return
        self._internet_enabled = on
        self._route_cache.clear()
        if not on:
            for rid, res in self._resources.items():
                if res.info.type == "internet":
                    self._drop_access(rid, now)
        self._emit_interface()

    @property
    def internet_resource_enabled(self) -> bool:
        """Whether the Internet resource is routed (off by default)."""
        return self._internet_enabled

    # --- portal messages ------------------------------------------------------------------------------
    def handle_portal_message(self, event: str, payload: Any, now: float) -> None:
        """A decoded message on the ``client`` channel; malformed ones are dropped and counted."""
        self._tick(now)
        handler = _PORTAL_HANDLERS.get(event)
        if handler is None:
            self._count("portal_unknown_event")
            log.debug("unknown portal event ignored", extra={"event": event})
            return
        try:
            handler(self, payload, now)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            self._count("portal_malformed")
            log.debug("malformed portal message dropped", extra={"event": event, "error": str(e)})
        self._drain_node(now)

    def _on_init(self, payload: dict[str, Any], now: float) -> None:
        self._apply_interface(payload.get("interface") or {})
        self._set_relays(_relay_infos(payload.get("relays")), replace=True, now=now)
        entries = payload.get("resources") or []
        if not isinstance(entries, list):
            raise TypeError("resources must be a list")
        fresh: dict[str, _Resource] = {}
        for e in entries:
            r = self._parse_resource(e)
            if r is not None:
                fresh[r.info.id] = r
        for rid in [rid for rid in self._resources if rid not in fresh]:
            self._remove_resource(rid, now)
        for r in fresh.values():
            self._upsert_resource(r, now)
        self._initialized = True
        self._resources_changed()
        self._emit_interface()

    def _on_config_changed(self, payload: dict[str, Any], now: float) -> None:
        self._apply_interface(payload.get("interface") or {})
        self._emit_interface()

    def _apply_interface(self, iface: dict[str, Any]) -> None:
        if not isinstance(iface, dict):
            raise TypeError("interface must be an object")
        v4, v6 = iface.get("ipv4"), iface.get("ipv6")
        self._ipv4 = str(ipaddress.IPv4Address(v4)) if v4 else None
        self._ipv6 = str(ipaddress.IPv6Address(v6)) if v6 else None
        sd = iface.get("search_domain")
        self._search_domain = str(sd).strip(".") or None if sd else None
        self._dns.set_search_domain(self._search_domain)
        upstreams: list[Addr] = []
        for u in iface.get("upstream_do53") or []:
            try:
                upstreams.append(_parse_hostport(str(u["ip"])))
            except (KeyError, ValueError, TypeError):
                self._count("bad_upstream")
        for u in iface.get("upstream_dns") or []:
            try:
                if u.get("protocol", "ip_port") == "ip_port":
                    upstreams.append(_parse_hostport(str(u["address"])))
            except (KeyError, ValueError, TypeError, AttributeError):
                self._count("bad_upstream")
        self._portal_upstreams = list(dict.fromkeys(upstreams))
        self._apply_upstreams()

    def _apply_upstreams(self) -> None:
        upstreams = self._portal_upstreams or self._system_upstreams
        self._sentinels = tuple(self._dns.set_upstreams(upstreams))

    def _on_resource_created_or_updated(self, payload: dict[str, Any], now: float) -> None:
        r = self._parse_resource(payload)
        if r is None:
            return
        self._upsert_resource(r, now)
        self._resources_changed()
        self._emit_interface()

    def _on_resource_deleted(self, payload: Any, now: float) -> None:
        rid = payload if isinstance(payload, str) else payload["id"]
        if rid not in self._resources:
            return
        self._remove_resource(rid, now)
        self._resources_changed()
        self._emit_interface()

    def _on_relays_presence(self, payload: dict[str, Any], now: float) -> None:
        for rid in payload.get("disconnected_ids") or []:
            self._relays.pop(str(rid), None)
        self._set_relays(_relay_infos(payload.get("connected")), replace=False, now=now)

    def _set_relays(
        self, entries: list[tuple[str, RelayInfo]], *, replace: bool, now: float
    ) -> None:
        fresh: dict[str, list[RelayInfo]] = {}
        for rid, info in entries:
            fresh.setdefault(rid, []).append(info)
        if replace:
            self._relays = fresh
        else:
            self._relays.update(fresh)
        self._node.update_relays([i for infos in self._relays.values() for i in infos], now)

    def _on_authorization_created(self, payload: dict[str, Any], now: float) -> None:
        rid = str(payload["resource_id"])
        gid = str(payload["gateway_id"])
        res = self._resources.get(rid)
        if res is None:
            self._count("authorization_unknown_resource")
            return
        if res.info.type == "internet" and not self._internet_enabled:
            self._count("authorization_internet_disabled")
            return
        key = b64decode_key(str(payload["gateway_public_key"]))
        psk_text = payload.get("preshared_key")
        psk = b64decode_key(str(psk_text)) if psk_text else None
        cice, gice = payload["client_ice_credentials"], payload["gateway_ice_credentials"]
        local = (str(cice["username"]), str(cice["password"]))
        remote = (str(gice["username"]), str(gice["password"]))
        exp = payload.get("expires_at")
        g = self._gateways.get(gid)
        if g is not None and not g.resources:
            # No authorization has used this connection since the last one ended (refused, went
            # silent): the gateway may have closed its side meanwhile (it does once the client has
            # no authorization left there), so start a new one rather than trust the old tunnel.
            self._close_gateway(g, "stale", now)
            self._drain_node(now)
            g = None
        if g is None:
            site = payload.get("site_id") or payload.get("gateway_group_id")
            v4, v6 = payload.get("gateway_ipv4"), payload.get("gateway_ipv6")
            g = self._gateways[gid] = _Gateway(gid, site, key, v4, v6)
        elif g.public_key != key:
            # The gateway restarted with a new key: upsert_connection replaces the connection.
            self._reset_gateway(g)
            g.public_key = key
        fresh = gid not in self._node.connections()
        self._node.upsert_connection(
            gid,
            peer_public_key=key,
            preshared_key=psk,
            local_creds=local,
            remote_creds=remote,
            now=now,
        )
        known = self._remote_candidates.get(gid)
        if known is not None and known[0] != key:
            del self._remote_candidates[gid]  # a restarted gateway: its old candidates are gone
        elif known is not None and fresh:
            # The portal's ICE credentials are the same for a pair every time, so a gateway that
            # still holds its side of the connection (we closed ours: network change, replaced)
            # treats the authorization as one it has and signals nothing; its candidates from
            # before are all we get.
            for sdp in list(known[1]):
                self._node.add_remote_candidate(gid, sdp, now)
        acc = self._access.setdefault(rid, _Access(rid))
        if acc.gateway_id is not None and acc.gateway_id != gid:
            self._unmap(acc, now)
        acc.gateway_id = gid
        acc.expires_at = float(exp) if exp else None
        acc.denied_reason, acc.violated = None, ()
        g.resources.add(rid)
        g.silent = False  # the portal chose it again: watch it afresh
        log.debug("authorization created", extra={"resource_id": rid, "gateway_id": gid})
        for other in [o for o in self._gateways.values() if o is not g and not o.resources]:
            # Replaced (it went silent, or the portal moved the resource); a later authorization
            # for it connects again.
            self._close_gateway(other, "replaced", now)
        if g.connected:
            acc.state = ONLINE
            self._flush_access(acc, now)
        else:
            acc.state = CONNECTING
        self._drain_node(now)

    def _on_authorization_creation_failed(self, payload: dict[str, Any], now: float) -> None:
        rid = str(payload["resource_id"])
        reason = str(payload.get("reason") or "unknown")
        violated = tuple(str(v) for v in payload.get("violated_properties") or ())
        acc = self._access.get(rid)
        if acc is None:
            acc = self._access[rid] = _Access(rid)
        if acc.gateway_id is not None:
            self._unmap(acc, now)
        acc.state = DENIED
        acc.denied_reason, acc.violated = reason, violated
        log.debug("authorization denied", extra={"resource_id": rid, "reason": reason})
        self._events.append(AccessDenied(rid, reason, violated))
        while acc.buffer:
            self._reject(acc.buffer.popleft(), reason)

    def _on_ice_candidates(self, payload: dict[str, Any], now: float) -> None:
        gid = str(payload["gateway_id"])
        g = self._gateways.get(gid)
        known = self._remote_candidates.get(gid)
        if g is not None and (known is None or known[0] != g.public_key):
            known = self._remote_candidates[gid] = (g.public_key, {})
        for c in payload.get("candidates") or []:
            if known is not None and len(known[1]) < MAX_REMEMBERED_CANDIDATES:
                known[1][str(c)] = None
            self._node.add_remote_candidate(gid, str(c), now)

    def _on_invalidate_ice_candidates(self, payload: dict[str, Any], now: float) -> None:
        gid = str(payload["gateway_id"])
        known = self._remote_candidates.get(gid)
        for c in payload.get("candidates") or []:
            if known is not None:
                known[1].pop(str(c), None)
            self._node.remove_remote_candidate(gid, str(c), now)

    def _on_disconnect(self, payload: Any, now: float) -> None:
        reason = payload.get("reason") if isinstance(payload, dict) else None
        self._events.append(PortalDisconnect(str(reason or "disconnected")))

    # --- resources ----------------------------------------------------------------------------------
    def _parse_resource(self, e: Any) -> _Resource | None:
        if not isinstance(e, dict):
            raise TypeError("a resource must be an object")
        rtype = e.get("type")
        if rtype not in _RESOURCE_TYPES:
            # Forward compatibility: types we do not know are ignored.
            self._count("resource_unknown_type")
            return None
        sites = e.get("sites") or e.get("gateway_groups") or []
        site = sites[0] if sites and isinstance(sites[0], dict) else {}
        address = e.get("address")
        net: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
        if rtype in ("cidr", "ip"):
            net = ipaddress.ip_network(str(address), strict=False)
            address = str(net)
        info = ResourceInfo(
            id=str(e["id"]),
            type="cidr" if rtype == "ip" else rtype,
            name=str(e.get("name") or ("Internet" if rtype == "internet" else address)),
            address=str(address) if address is not None else None,
            address_description=e.get("address_description"),
            site_id=site.get("id"),
            site_name=site.get("name"),
        )
        return _Resource(info, net, e)

    def _upsert_resource(self, r: _Resource, now: float) -> None:
        rid = r.info.id
        old = self._resources.get(rid)
        self._resources[rid] = r
        if old is not None and (
            old.info.address != r.info.address
            or old.info.type != r.info.type
            or old.info.site_id != r.info.site_id
        ):
            # The gateway's authorization was for the old address / site: start over.
            self._drop_access(rid, now)
        self._rebuild_routing()

    def _remove_resource(self, rid: str, now: float) -> None:
        self._resources.pop(rid, None)
        self._drop_access(rid, now)
        self._access.pop(rid, None)
        self._rebuild_routing()

    def _rebuild_routing(self) -> None:
        cidrs: list[tuple[int, int, int, int, str]] = []
        dns: list[tuple[str, str]] = []
        for r in self._resources.values():
            n = r.net
            if n is not None:
                cidrs.append(
                    (n.version, int(n.network_address), int(n.netmask), n.prefixlen, r.info.id)
                )
            elif r.info.type == "dns" and r.info.address:
                dns.append((r.info.id, r.info.address))
        cidrs.sort(key=lambda c: -c[3])
        self._cidrs = cidrs
        self._route_cache.clear()
        self._dns.set_resources(dns)

    def _resources_changed(self) -> None:
        if self._initialized:
            self._events.append(ResourcesChanged(tuple(r.info for r in self._resources.values())))

    def _routes(self) -> tuple[str, ...]:
        routes: list[str] = []
        if self._ipv4:
            routes += [f"{self._ipv4}/32", str(IPV4_TUNNEL), str(IPV4_PROXY), str(IPV4_SENTINELS)]
        if self._ipv6:
            routes += [f"{self._ipv6}/128", str(IPV6_TUNNEL), str(IPV6_PROXY), str(IPV6_SENTINELS)]
        for r in self._resources.values():
            if r.net is not None:
                routes.append(str(r.net))
            elif r.info.type == "internet" and self._internet_enabled:
                routes += INTERNET_ROUTES
        return tuple(dict.fromkeys(routes))

    def _emit_interface(self) -> None:
        if not self._initialized:
            return
        ev = TunInterfaceUpdated(
            self._ipv4, self._ipv6, self._routes(), self._sentinels, self._search_domain
        )
        if ev != self._last_tun:
            self._last_tun = ev
            self._events.append(ev)

    # --- routing packets from the TUN ----------------------------------------------------------------
    def _resource_for(self, version: int, dst: int) -> tuple[str, str | None] | None:
        """(resource id, DNS name or None) for a destination."""
        proxy = _PROXY4 if version == 4 else _PROXY6
        if dst & proxy[1] == proxy[0]:
            hit = self._dns.resolve_proxy_ip(_ip_str(version, dst))
            return (hit[0], hit[1].lower()) if hit is not None else None
        key = (version, dst)
        try:
            rid = self._route_cache[key]
        except KeyError:
            rid = None
            for v, net, mask, _plen, cand in self._cidrs:
                if v == version and dst & mask == net:
                    rid = cand
                    break
            if rid is None and self._internet_enabled:
                rid = next(
                    (r.info.id for r in self._resources.values() if r.info.type == "internet"), None
                )
            if len(self._route_cache) >= _ROUTE_CACHE_MAX:
                self._route_cache.clear()
            self._route_cache[key] = rid
        return (rid, None) if rid is not None else None

    def handle_tun_packet(self, packet: bytes, now: float) -> None:
        """An IP packet an application sent into the tunnel."""
        dst = _dst_of(packet)
        if dst is None:
            self._count("tun_not_ip")
            return
        hit = self._resource_for(*dst)
        if hit is None:
            self._count("tun_no_resource")
            if log.isEnabledFor(TRACE):
                log.log(TRACE, "packet to a non-resource dropped", extra={"dst": _ip_str(*dst)})
            return
        self._route(hit[0], hit[1], bytes(packet), now)
        self._drain_node(now)

    def _route(self, rid: str, domain: str | None, packet: bytes, now: float) -> None:
        acc = self._access.get(rid)
        if acc is None:
            if rid not in self._resources:
                self._count("tun_unknown_resource")
                return
            acc = self._access[rid] = _Access(rid)
        deadline = self._expiry(acc)
        if deadline is not None and now >= deadline:
            self._expire(acc, now)
        if acc.state == ONLINE:
            g = self._gateways[acc.gateway_id]  # type: ignore[index]
            if domain is None:
                self._send(g, packet, now)
            else:
                self._send_dns(g, rid, domain, packet, now)
            return
        if acc.state == DENIED and not self._may_request(acc, now):
            self._reject(packet, acc.denied_reason or "forbidden")
            return
        if len(acc.buffer) >= MAX_BUFFERED_PER_RESOURCE:
            acc.buffer.popleft()
            acc.dropped += 1
            self._count("buffer_dropped")
        acc.buffer.append(packet)
        if acc.state in (NONE, DENIED, AUTHORIZING):
            self._request(acc, now)

    def _may_request(self, acc: _Access, now: float) -> bool:
        return acc.last_request is None or now - acc.last_request >= AUTHORIZATION_INTERVAL

    def _request(self, acc: _Access, now: float, *, force: bool = False) -> None:
        if acc.state != CONNECTING and acc.state != ONLINE:
            acc.state = AUTHORIZING
        if not force and not self._may_request(acc, now):
            return
        acc.last_request = now
        connected = sorted(g.id for g in self._gateways.values() if g.connected and not g.silent)
        log.debug("requesting authorization", extra={"resource_id": acc.resource_id})
        self._portal_out.append(
            (
                "request_authorization",
                {"resource_id": acc.resource_id, "connected_gateway_ids": connected},
            )
        )

    def _send(self, g: _Gateway, packet: bytes, now: float) -> None:
        t = self._node.encapsulate(g.id, packet, now)
        if t is not None:
            self._transmits.append(t)
        if g.unanswered_since is None:
            g.unanswered_since = now
            g.probe_at = now + LIVENESS_PROBE_AFTER
            g.rx_mark = self._rx_bytes(g)

    def _send_dns(self, g: _Gateway, rid: str, domain: str, packet: bytes, now: float) -> None:
        d = g.domains.get(domain)
        if d is None or d.resource_id != rid:
            d = g.domains[domain] = _Domain(rid, domain, self._dns.proxy_ips_of(domain))
            self._send_assigned_ips(g, d, now)
        if d.active:
            self._send(g, packet, now)
            return
        if len(d.buffer) == d.buffer.maxlen:
            self._count("domain_buffer_dropped")
        d.buffer.append(packet)

    def _send_assigned_ips(self, g: _Gateway, d: _Domain, now: float) -> None:
        body = json.dumps(
            {"resource": d.resource_id, "domain": d.domain, "proxy_ips": d.proxy_ips},
            separators=(",", ":"),
        ).encode()
        self._send(g, ipp.build_p2p_control(ipp.P2P_ASSIGNED_IPS, body), now)
        d.resend_at = now + ASSIGNED_IPS_INTERVAL

    def _flush_access(self, acc: _Access, now: float) -> None:
        """Send what waited for the connection, through the normal route (DNS names included)."""
        pending, acc.buffer = acc.buffer, deque()
        for p in pending:
            d = _dst_of(p)
            hit = self._resource_for(*d) if d is not None else None
            if hit is None or hit[0] != acc.resource_id:
                self._count("buffer_stale")
                continue
            self._route(hit[0], hit[1], p, now)

    def _reject(self, packet: bytes, reason: str) -> None:
        """Answer an application's packet with an ICMP error as if the gateway had."""
        if reason == "forbidden":
            reply = ipp.icmp_prohibited(packet)
        else:
            reply = ipp.icmp_host_unreachable(packet)
        if reply is not None:
            self._tun_out.append(reply)

    def _unmap(self, acc: _Access, now: float) -> None:
        """Forget which gateway serves ``acc``; packets wait for a new authorization."""
        gid = acc.gateway_id
        acc.gateway_id = None
        acc.expires_at = None
        if acc.state in (CONNECTING, ONLINE):
            acc.state = NONE
        g = self._gateways.get(gid) if gid is not None else None
        if g is None:
            return
        g.resources.discard(acc.resource_id)
        for name in [n for n, d in g.domains.items() if d.resource_id == acc.resource_id]:
            d = g.domains.pop(name)
            acc.buffer.extend(d.buffer)

    def _expiry(self, acc: _Access) -> float | None:
        """When ``acc``'s authorization runs out, in loop time (None: no expiry or none held).

        poll_timeout, handle_timeout and the packet path all compare against this one value, so
        a deadline poll_timeout reports is always due in handle_timeout.
        """
        if acc.gateway_id is None or acc.expires_at is None:
            return None
        return acc.expires_at - self._unix_offset

    def _expire(self, acc: _Access, now: float) -> None:
        """The authorization ran out: forget its gateway, and the connection if nothing else uses it."""
        log.debug("authorization expired", extra={"resource_id": acc.resource_id})
        gid = acc.gateway_id
        self._unmap(acc, now)
        g = self._gateways.get(gid) if gid is not None else None
        if g is not None and not g.resources:
            # The gateway closes its side once the client has no authorization left there; a
            # connection kept here would carry the next packets into a tunnel that is gone.
            self._close_gateway(g, "authorizations expired", now)

    def _drop_access(self, rid: str, now: float) -> None:
        """The resource is gone or changed: drop its authorization and, if unused, the connection."""
        acc = self._access.get(rid)
        if acc is None:
            return
        gid = acc.gateway_id
        self._unmap(acc, now)
        acc.state = NONE
        acc.buffer.clear()
        acc.last_request = None
        acc.denied_reason, acc.violated = None, ()
        g = self._gateways.get(gid) if gid is not None else None
        if g is not None and not g.resources:
            self._close_gateway(g, "no resources left", now)

    def _close_gateway(self, g: _Gateway, reason: str, now: float) -> None:
        log.debug("closing gateway connection", extra={"gateway_id": g.id, "reason": reason})
        del self._gateways[g.id]
        self._events.append(ConnectionDown(g.id, reason))
        self._node.remove_connection(g.id, now)  # its ConnectionClosed finds nothing left to do

    def _reset_gateway(self, g: _Gateway) -> None:
        for rid in g.resources:
            acc = self._access.get(rid)
            if acc is not None and acc.state == ONLINE:
                acc.state = CONNECTING
        g.connected = False
        g.path = g.rtt = None
        g.silent = False
        g.unanswered_since = None
        g.domains.clear()

    # --- datagrams -----------------------------------------------------------------------------------
    def handle_datagram(self, local: Addr, remote: Addr, data: bytes, now: float) -> None:
        """A UDP datagram received on the socket bound to ``local``."""
        got = self._node.handle_datagram(local, remote, data, now)
        if got is not None:
            gid, packet = got
            g = self._gateways.get(gid)
            if g is not None:
                g.unanswered_since = None
                if g.silent:
                    g.silent = False
                self._from_gateway(g, packet, now)
            else:
                self._count("packet_from_unknown_gateway")
        self._drain_node(now)

    def _from_gateway(self, g: _Gateway, packet: bytes, now: float) -> None:
        # Fast path: only ICMP / ICMPv6 and the p2p control protocol (0xFF) need a closer look.
        if (packet[9] != 1) if packet[0] >> 4 == 4 else (packet[6] != 58 and packet[6] != 0xFF):
            self._tun_out.append(packet)
            return
        ctl = ipp.parse_p2p_control(packet)
        if ctl is not None:
            self._on_p2p_control(g, ctl[0], ctl[1], now)
            return
        if _is_probe_answer(packet):
            self._count("probe_answered")
            return
        quoted = ipp.prohibited_quoted_dst(packet)
        if quoted is not None:
            # firezone-notes §3.6: the gateway no longer lets this through: ask the portal again.
            hit = self._resource_for(*quoted)
            acc = self._access.get(hit[0]) if hit is not None else None
            if acc is not None:
                self._request(acc, now)
        self._tun_out.append(packet)

    def _on_p2p_control(self, g: _Gateway, kind: int, body: bytes, now: float) -> None:
        if kind != ipp.P2P_DOMAIN_STATUS:
            self._count("p2p_ignored")
            return
        try:
            msg = json.loads(body)
            domain = str(msg["domain"]).lower().rstrip(".")
        except (ValueError, KeyError, TypeError):
            self._count("p2p_malformed")
            return
        d = g.domains.get(domain)
        if d is None:
            self._count("p2p_unknown_domain")
            return
        log.debug("domain status", extra={"domain": domain, "status": msg.get("status")})
        d.resend_at = None
        d.active = True
        while d.buffer:
            self._send(g, d.buffer.popleft(), now)

    # --- DNS -----------------------------------------------------------------------------------------
    def handle_dns_query(self, data: bytes, *, sentinel: str, tcp: bool, now: float) -> StubResult:
        """A DNS query that reached a sentinel address: answered, forwarded or dropped by the stub."""
        self._tick(now)
        result = self._dns.handle_query(data, sentinel=sentinel, tcp=tcp, now=now)
        while (ev := self._dns.poll_event()) is not None:
            if isinstance(ev, DomainResolved):
                self._on_domain_resolved(ev, now)
        self._drain_node(now)
        return result

    def _on_domain_resolved(self, ev: DomainResolved, now: float) -> None:
        acc = self._access.get(ev.resource_id)
        if acc is None or acc.state != ONLINE or acc.gateway_id is None:
            return
        g = self._gateways[acc.gateway_id]
        domain = ev.domain.lower().rstrip(".")
        d = g.domains.get(domain)
        if d is None:
            # The tunnel is up already: tell the gateway now so the first packet need not wait.
            d = g.domains[domain] = _Domain(ev.resource_id, domain, list(ev.proxy_ips))
        else:
            d.proxy_ips = list(ev.proxy_ips)
        self._send_assigned_ips(g, d, now)

    # --- node events ----------------------------------------------------------------------------------
    def _drain_node(self, now: float) -> None:
        node = self._node
        cands: dict[tuple[str, str], list[str]] | None = None
        while (ev := node.poll_event()) is not None:
            if isinstance(ev, NewIceCandidate | InvalidateIceCandidate):
                kind = "new" if isinstance(ev, NewIceCandidate) else "invalidate"
                if cands is None:
                    cands = {}
                cands.setdefault((f"{kind}_ice_candidates", ev.peer_id), []).append(ev.sdp)
            elif isinstance(ev, ConnectionEstablished):
                self._on_established(ev.peer_id, ev.path, ev.rtt, now)
            elif isinstance(ev, PathChanged):
                g = self._gateways.get(ev.peer_id)
                if g is not None:
                    g.path, g.rtt = ev.path, ev.rtt
                    self._events.append(ConnectionPathChanged(g.id, ev.path, ev.rtt))
            elif isinstance(ev, ConnectionFailed):
                self._on_connection_gone(ev.peer_id, ev.reason, now)
            elif isinstance(ev, ConnectionClosed):
                self._on_connection_gone(ev.peer_id, "closed", now)
        for (event, gid), sdps in (cands or {}).items():
            self._portal_out.append((event, {"gateway_id": gid, "candidates": sdps}))
        while (t := node.poll_transmit()) is not None:
            self._transmits.append(t)

    def _on_established(self, gid: str, path: str, rtt: float | None, now: float) -> None:
        g = self._gateways.get(gid)
        if g is None:
            return
        g.connected, g.path, g.rtt = True, path, rtt
        g.silent, g.unanswered_since = False, None
        log.debug("gateway connected", extra={"gateway_id": gid, "path": path})
        self._events.append(ConnectionUp(gid, path, rtt))
        for rid in sorted(g.resources):
            acc = self._access.get(rid)
            if acc is not None and acc.gateway_id == gid:
                acc.state = ONLINE
                self._flush_access(acc, now)

    def _on_connection_gone(self, gid: str, reason: str, now: float) -> None:
        g = self._gateways.pop(gid, None)
        if g is None:
            return
        log.debug("gateway connection gone", extra={"gateway_id": gid, "reason": reason})
        self._events.append(ConnectionDown(gid, reason))
        for rid in sorted(g.resources):
            acc = self._access.get(rid)
            if acc is None or acc.gateway_id != gid:
                continue
            self._unmap(acc, now)
            if acc.buffer:
                self._request(acc, now)

    # --- timers --------------------------------------------------------------------------------------
    def _rx_bytes(self, g: _Gateway) -> int:
        try:
            rx = self._node.stats(g.id)["rx_bytes"]
        except KeyError:
            return 0
        return rx if isinstance(rx, int) else 0

    def poll_timeout(self) -> float | None:
        """The next instant :meth:`handle_timeout` has work (``now`` while output is queued)."""
        if self._transmits or self._events or self._portal_out or self._tun_out:
            return self._now
        best = self._node.poll_timeout()
        for acc in self._access.values():
            t = self._expiry(acc)
            if t is not None and (best is None or t < best):
                best = t
        for g in self._gateways.values():
            if g.unanswered_since is not None and not g.silent:
                t = g.unanswered_since + GATEWAY_SILENT_TIMEOUT
                if g.probe_at is not None:
                    t = min(t, g.probe_at)
                if best is None or t < best:
                    best = t
            if not g.connected:
                continue  # AssignedIps are resent only through an established tunnel
            for d in g.domains.values():
                if d.resend_at is not None and (best is None or d.resend_at < best):
                    best = d.resend_at
        return best

    def handle_timeout(self, now: float) -> None:
        """Advance the Node, expire authorizations, retransmit AssignedIps, notice silent gateways."""
        self._tick(now)
        t = self._node.poll_timeout()
        if t is not None and t <= now:
            self._node.handle_timeout(now)
        self._drain_node(now)
        for acc in list(self._access.values()):
            t = self._expiry(acc)
            if t is not None and now >= t:
                self._expire(acc, now)
        for g in list(self._gateways.values()):
            if g.probe_at is not None and now >= g.probe_at and g.unanswered_since is not None:
                g.probe_at = None
                if self._rx_bytes(g) > g.rx_mark:
                    g.unanswered_since = None  # a keepalive or handshake arrived: alive
                else:
                    self._probe(g, now)
            if (
                g.unanswered_since is not None
                and now >= g.unanswered_since + GATEWAY_SILENT_TIMEOUT
            ):
                if self._rx_bytes(g) > g.rx_mark:
                    g.unanswered_since = None  # a keepalive or handshake arrived: alive
                elif not g.silent:
                    self._on_silent(g, now)
            if g.connected:
                for d in list(g.domains.values()):
                    if d.resend_at is not None and now >= d.resend_at:
                        self._send_assigned_ips(g, d, now)
        self._drain_node(now)

    def _probe(self, g: _Gateway, now: float) -> None:
        if g.ipv4 and self._ipv4:
            src, dst = self._ipv4, g.ipv4
        elif g.ipv6 and self._ipv6:
            src, dst = self._ipv6, g.ipv6
        else:
            return
        pkt = ipp.build_echo(src, dst, PROBE_ICMP_ID, g.probes & 0xFFFF, b"fz-liveness")
        g.probes += 1
        self._count("probe_sent")
        self._send(g, pkt, now)

    def _on_silent(self, g: _Gateway, now: float) -> None:
        if not g.resources:
            # Nothing uses it any more (its authorizations ended); the gateway closed its side.
            self._close_gateway(g, "silent", now)
            return
        g.silent = True
        g.unanswered_since = None
        rids = tuple(sorted(g.resources))
        log.debug("gateway silent, asking for another", extra={"gateway_id": g.id})
        self._events.append(GatewaySilent(g.id, rids))
        for rid in rids:
            acc = self._access.get(rid)
            if acc is None or acc.gateway_id != g.id:
                continue
            self._unmap(acc, now)
            self._request(acc, now, force=True)

    # --- outputs -------------------------------------------------------------------------------------
    def poll_portal_message(self) -> tuple[str, dict[str, Any]] | None:
        """The next ``(event, payload)`` to push on the portal channel."""
        return self._portal_out.popleft() if self._portal_out else None

    def poll_tun_packet(self) -> bytes | None:
        """The next IP packet for the applications (replies, ICMP errors)."""
        return self._tun_out.popleft() if self._tun_out else None

    def poll_transmit(self) -> Transmit | None:
        """The next UDP datagram to send."""
        return self._transmits.popleft() if self._transmits else None

    def poll_event(self) -> ClientEvent | None:
        """The next event for the role (interface changes, denials, connection changes)."""
        return self._events.popleft() if self._events else None

    # --- status ----------------------------------------------------------------------------------------
    def resource_status(self, rid: str) -> str:
        """``online``, ``connecting``, ``authorizing``, a denial reason, ``off`` (the Internet
        resource while disabled) or ``idle`` (not in use: access is asked for on first use)."""
        res = self._resources.get(rid)
        if res is not None and res.info.type == "internet" and not self._internet_enabled:
            return "off"
        acc = self._access.get(rid)
        if acc is None or acc.state == NONE:
            return "idle"
        if acc.state == DENIED:
            return acc.denied_reason or "denied"
        return acc.state

    def status(self) -> dict[str, Any]:
        """Resources, connections and interface: what ``fz client status --json`` prints."""
        resources = []
        for r in self._resources.values():
            acc = self._access.get(r.info.id)
            item: dict[str, Any] = {
                "id": r.info.id,
                "name": r.info.name,
                "type": r.info.type,
                "address": r.info.address,
                "address_description": r.info.address_description,
                "site": {"id": r.info.site_id, "name": r.info.site_name},
                "status": self.resource_status(r.info.id),
                "gateway_id": acc.gateway_id if acc is not None else None,
            }
            if r.info.type == "internet":
                item["enabled"] = self._internet_enabled
            if acc is not None and acc.state == DENIED:
                item["violated_properties"] = list(acc.violated)
            resources.append(item)
        connections = []
        for g in self._gateways.values():
            try:
                st = self._node.stats(g.id)
            except KeyError:
                st = {}
            path = g.path or st.get("path")
            connections.append(
                {
                    "gateway_id": g.id,
                    "site_id": g.site_id,
                    "state": "silent"
                    if g.silent
                    else ("connected" if g.connected else "connecting"),
                    "path": None if path is None else ("relayed" if path == "relay" else "direct"),
                    "candidate_pair": path,
                    "rtt_ms": None if g.rtt is None else round(g.rtt * 1000.0, 3),
                    "rx_bytes": st.get("rx_bytes", 0),
                    "tx_bytes": st.get("tx_bytes", 0),
                    "resources": sorted(g.resources),
                }
            )
        return {
            "interface": {
                "ipv4": self._ipv4,
                "ipv6": self._ipv6,
                "dns_sentinels": list(self._sentinels),
                "search_domain": self._search_domain,
            },
            "internet_resource_enabled": self._internet_enabled,
            "resources": resources,
            "connections": connections,
            "relays": sorted(self._relays),
            "counters": dict(self.stats_counters),
        }


_PORTAL_HANDLERS: dict[str, Any] = {
    "init": ClientState._on_init,
    "config_changed": ClientState._on_config_changed,
    "resource_created_or_updated": ClientState._on_resource_created_or_updated,
    "resource_deleted": ClientState._on_resource_deleted,
    "relays_presence": ClientState._on_relays_presence,
    "authorization_created": ClientState._on_authorization_created,
    "flow_created": ClientState._on_authorization_created,
    "authorization_creation_failed": ClientState._on_authorization_creation_failed,
    "flow_creation_failed": ClientState._on_authorization_creation_failed,
    "ice_candidates": ClientState._on_ice_candidates,
    "invalidate_ice_candidates": ClientState._on_invalidate_ice_candidates,
    "disconnect": ClientState._on_disconnect,
}
