"""The gateway's data-plane decisions: authorizations, traffic filters, DNS-resource NAT, flow tracking.

Theory of operation
-------------------
The portal grants a client access to a resource (``add_authorization``), optionally until a UNIX
``expires_at``; it takes it back with ``remove_authorization`` (``reject_access``), changes its filters
with ``update_resource`` and the whole client goes with ``remove_client``. Packets arrive from two
sides:

* ``handle_tunnel_packet(client_id, packet)`` — decrypted from the client's WireGuard tunnel. The
  source must be the client's tunnel IP. The packet belongs to a *flow* keyed by the inside 5-tuple
  ``(client, proto, src, sport, dst, dport)`` (ICMP echo: the identifier is both ports). An
  established flow is one dict lookup plus counters. A new flow is decided once:

    - dst is one of the client's proxy IPs (a DNS resource) -> the resource behind that name; the
      flow is NATed proxy IP -> real IP, the source port (echo identifier) remapped to the first
      free one at or above the inside one when another flow of this client already uses the same
      (proto, outside port, real IP, remote port); unresolvable name -> ICMP host unreachable;
    - dst inside an authorized CIDR/IP resource (longest prefix wins) or, for the Internet
      resource, any global address -> forwarded unchanged (the runtime masquerades);
    - the resource's filters must allow (empty list = everything; tcp/udp by destination port
      range; icmp allowed or not); anything else is answered with ICMP "administratively
      prohibited" queued for the client (``poll_tunnel_packet``) and dropped.

  Peer-to-peer control packets (IPv6 ``::`` -> ``::``, protocol 0xFF) are consumed: ``AssignedIps``
  tells which proxy IPs stand for which name; the name is resolved (``poll_dns_query`` /
  ``handle_dns_result``, answers cached for their TTL or 30 s, a query given up after 10 s) and the
  client is told ``DomainStatus`` once the proxy IPs are mapped.

* ``handle_tun_packet(packet)`` — replies from the TUN device, destination = a client's tunnel IP.
  Looked up by the reverse key ``(proto, remote, remote port, client IP, outside port)``; DNS flows
  are translated back (real IP -> proxy IP, outside -> inside port), ICMP errors quoting a flow's
  packet are translated inside and out. Anything without a flow is dropped.

Non-first IP fragments carry no ports; in either direction they follow the most recent flow between
the same two addresses (its first fragment created or matched that flow), translated likewise.

Flow lifetime (firezone-notes §3.5): idle TTL TCP 2 h 4 min, UDP 2 min, ICMP 2 min; never answered
60 s; 5 s after FINs were seen both ways; at once after an RST; at once when the authorization
behind it goes. Each flow produces ``FlowStarted`` and ``FlowCompleted`` events and, on completion,
one INFO line on the ``firezone.flow_logs`` logger. Counters: ``rx_*`` is what the gateway received
from the client (client -> resource), ``tx_*`` what it sent to the client.

Timers: authorization expiry, DNS query timeout, and a flow sweep (at most once a second).
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
from firezone.proto.dns.patterns import Pattern, compile_pattern, normalize_name
from firezone.proto.rng import Rng

log = logging.getLogger(__name__)
flow_log = logging.getLogger("firezone.flow_logs")

# firezone-notes §3.5: NAT / conn-track lifetimes.
TCP_TTL = 2 * 3600 + 4 * 60
UDP_TTL = 120.0
ICMP_TTL = 120.0
OTHER_TTL = 120.0
UNANSWERED_TTL = 60.0
FIN_LINGER = 5.0
# firezone-notes §3.5: the gateway caches a resolution for 30 s; its resolver gives up after 10 s.
DNS_CACHE_TTL = 30.0
DNS_TIMEOUT = 10.0
SWEEP_INTERVAL = 1.0
MAX_PROXY_IPS = 8

# firezone-notes §3.1: proxy IPs for DNS resources.
PROXY_V4 = ipaddress.ip_network("100.96.0.0/11")
PROXY_V6 = ipaddress.ip_network("fd00:2021:1111:8000::/107")

PROTO_NAMES = {
    ipp.PROTO_TCP: "tcp",
    ipp.PROTO_UDP: "udp",
    ipp.PROTO_ICMP: "icmp",
    ipp.PROTO_ICMPV6: "icmp",
}


class GatewayError(Exception):
    """API misuse of :class:`GatewayState` (never raised for network input)."""


# --- inputs / outputs --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ClientInfo:
    """A client as the portal describes it in ``create_authorization``."""

    id: str
    ipv4: str | None
    ipv6: str | None
    public_key: str = ""
    actor_id: str | None = None
    actor_email: str | None = None
    actor_name: str | None = None

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("client id must not be empty")
        if self.ipv4 is None and self.ipv6 is None:
            raise ValueError("client needs a tunnel IPv4 or IPv6 address")
        if self.ipv4 is not None:
            ipaddress.IPv4Address(self.ipv4)
        if self.ipv6 is not None:
            ipaddress.IPv6Address(self.ipv6)

    @property
    def user(self) -> str | None:
        return self.actor_email or self.actor_name or self.actor_id

    @classmethod
    def from_payload(
        cls, client: dict[str, Any], subject: dict[str, Any] | None = None
    ) -> ClientInfo:
        """From ``create_authorization``'s ``client`` and ``subject`` objects (firezone-notes §1.5)."""
        subject = subject or {}

        def opt(d: dict[str, Any], k: str) -> str | None:
            v = d.get(k)
            return None if v is None else str(v)

        return cls(
            id=str(client["id"]),
            ipv4=opt(client, "ipv4"),
            ipv6=opt(client, "ipv6"),
            public_key=str(client.get("public_key", "")),
            actor_id=opt(subject, "actor_id"),
            actor_email=opt(subject, "actor_email"),
            actor_name=opt(subject, "actor_name"),
        )


@dataclass(frozen=True, slots=True)
class DnsQuery:
    """Resolve ``domain`` (A and AAAA) and answer with ``handle_dns_result(id, ...)``."""

    id: int
    domain: str


class GatewayEvent:
    """Base of everything ``GatewayState.poll_event`` returns."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class FlowStarted(GatewayEvent):
    client_id: str
    user: str | None
    resource_id: str
    domain: str | None
    protocol: str
    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int
    real_dst_ip: str
    started_at: float


@dataclass(frozen=True, slots=True)
class FlowCompleted(GatewayEvent):
    client_id: str
    user: str | None
    resource_id: str
    domain: str | None
    protocol: str
    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int
    real_dst_ip: str
    started_at: float
    ended_at: float
    rx_bytes: int
    tx_bytes: int
    rx_packets: int
    tx_packets: int
    reason: str


@dataclass(frozen=True, slots=True)
class AccessExpired(GatewayEvent):
    client_id: str
    resource_id: str


@dataclass(frozen=True, slots=True)
class ClientAccessEnded(GatewayEvent):
    """The client has no authorization left: the connection to it may be closed."""

    client_id: str


# --- resources and filters ---------------------------------------------------------------------------
@dataclass(slots=True)
class _Filter:
    permit_all: bool = True
    tcp: list[tuple[int, int]] = field(default_factory=list)
    udp: list[tuple[int, int]] = field(default_factory=list)
    icmp: bool = False

    def allows(self, proto: int, dport: int) -> bool:
        if self.permit_all:
            return True
        if proto == ipp.PROTO_TCP:
            ranges = self.tcp
        elif proto == ipp.PROTO_UDP:
            ranges = self.udp
        elif proto in (ipp.PROTO_ICMP, ipp.PROTO_ICMPV6):
            return self.icmp
        else:
            return False
        return any(lo <= dport <= hi for lo, hi in ranges)


def _parse_ports(text: str) -> tuple[int, int]:
    lo, _, hi = str(text).partition("-")
    a, b = int(lo), int(hi or lo)
    if not 0 <= a <= b <= 65535:
        raise ValueError(f"bad port range {text!r}")
    return a, b


def parse_filters(filters: Any) -> _Filter:
    """Compile the wire filters (``{protocol, port_range_start, port_range_end}``; also ``ports``)."""
    if not filters:
        return _Filter()
    f = _Filter(permit_all=False)
    for item in filters:
        proto = str(item["protocol"]).lower()
        if proto == "icmp":
            f.icmp = True
            continue
        if proto not in ("tcp", "udp"):
            raise ValueError(f"unknown filter protocol {proto!r}")
        if "ports" in item:
            ranges = [_parse_ports(p) for p in item["ports"]] or [(0, 65535)]
        else:
            lo = item.get("port_range_start")
            hi = item.get("port_range_end")
            lo = 0 if lo is None else int(lo)
            hi = 65535 if hi is None else int(hi)
            if not 0 <= lo <= hi <= 65535:
                raise ValueError(f"bad port range {lo}-{hi}")
            ranges = [(lo, hi)]
        (f.tcp if proto == "tcp" else f.udp).extend(ranges)
    return f


# RFC 5737 / RFC 3849 documentation networks are routed nowhere on the real internet; counting
# them as internet lets a test network built from them (the lab) stand in for it. Private,
# shared (100.64/10), loopback, link-local, multicast and reserved space is never the Internet
# resource's: reaching it takes a resource and a policy of its own.
_DOCUMENTATION = tuple(ipaddress.ip_network(n) for n in
                       ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32"))


def _is_internet(a: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return (a.is_global and not a.is_multicast) or any(a in n for n in _DOCUMENTATION if n.version == a.version)


@dataclass(slots=True)
class _Resource:
    id: str
    type: str  # "cidr" | "dns" | "internet"
    name: str
    address: str
    filter: _Filter
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    pattern: Pattern | None = None

    def contains(self, dst: bytes) -> int:
        """Prefix length when ``dst`` is inside this CIDR/Internet resource, else -1."""
        if self.type == "internet":
            return 0 if _is_internet(ipaddress.ip_address(dst)) else -1
        net = self.network
        if net is None or (net.version == 4) != (len(dst) == 4):
            return -1
        if int.from_bytes(dst, "big") & int(net.netmask) == int(net.network_address):
            return net.prefixlen
        return -1


def parse_resource(res: dict[str, Any]) -> _Resource:
    """A gateway resource from the portal's JSON (``ValueError``/``KeyError``/``TypeError`` when malformed)."""
    rid = str(res["id"])
    rtype = str(res.get("type", "cidr"))
    filt = parse_filters(res.get("filters"))
    name = str(res.get("name", ""))
    if rtype == "internet":
        return _Resource(rid, "internet", name or "Internet", "", filt)
    address = str(res["address"])
    if rtype in ("cidr", "ip"):
        return _Resource(
            rid, "cidr", name, address, filt, network=ipaddress.ip_network(address, strict=False)
        )
    if rtype == "dns":
        return _Resource(rid, "dns", name, address, filt, pattern=compile_pattern(address))
    raise ValueError(f"unknown resource type {rtype!r}")


# --- per-client state --------------------------------------------------------------------------------
@dataclass(slots=True)
class _Auth:
    resource: _Resource
    expires_at: float | None  # monotonic deadline


@dataclass(slots=True)
class _Proxy:
    resource_id: str
    domain: str
    real: bytes | None  # None: the name has no address of this family


@dataclass(slots=True)
class _Client:
    info: ClientInfo
    ips: tuple[bytes, ...]
    auths: dict[str, _Auth] = field(default_factory=dict)
    proxies: dict[bytes, _Proxy] = field(default_factory=dict)


class _Flow:
    __slots__ = (
        "answered",
        "client",
        "closing_at",
        "domain",
        "dport",
        "dst",
        "fin_rx",
        "fin_tx",
        "icmp",
        "in_key",
        "last_seen",
        "nat",
        "out_dst",
        "out_key",
        "out_port",
        "proto",
        "resource_id",
        "rx_bytes",
        "rx_packets",
        "sport",
        "src",
        "started",
        "started_unix",
        "tx_bytes",
        "tx_packets",
    )

    def __init__(
        self,
        client: _Client,
        resource_id: str,
        domain: str | None,
        proto: int,
        icmp: bool,
        src: bytes,
        sport: int,
        dst: bytes,
        dport: int,
        out_dst: bytes,
        out_port: int,
        now: float,
        unix: float,
    ) -> None:
        self.client = client
        self.resource_id = resource_id
        self.domain = domain
        self.proto = proto
        self.icmp = icmp
        self.src, self.sport, self.dst, self.dport = src, sport, dst, dport
        self.out_dst, self.out_port = out_dst, out_port
        self.nat = out_dst != dst or out_port != sport
        self.out_key = (client.info.id, proto, src, sport, dst, dport)
        self.in_key = _in_key(proto, icmp, out_dst, dport, src, out_port)
        self.rx_bytes = self.tx_bytes = self.rx_packets = self.tx_packets = 0
        self.started, self.started_unix = now, unix
        self.last_seen = now
        self.answered = False
        self.fin_rx = self.fin_tx = False
        self.closing_at: float | None = None

    def deadline(self) -> float:
        if self.closing_at is not None:
            return self.closing_at
        if not self.answered:
            return self.last_seen + UNANSWERED_TTL
        if self.proto == ipp.PROTO_TCP:
            return self.last_seen + TCP_TTL
        if self.proto == ipp.PROTO_UDP:
            return self.last_seen + UDP_TTL
        return self.last_seen + (ICMP_TTL if self.icmp else OTHER_TTL)


def _in_key(
    proto: int, icmp: bool, remote: bytes, remote_port: int, client_ip: bytes, out_port: int
) -> tuple[int, bytes, int, bytes, int]:
    # An echo reply carries the identifier we sent in both "port" positions.
    return (proto, remote, out_port if icmp else remote_port, client_ip, out_port)


def _ports(p: ipp.Packet) -> tuple[int, int, bool] | None:
    """(sport, dport, is_echo) of a packet a flow can carry; None when it has no usable header."""
    if p.l4 < 0:
        return None
    proto = p.proto
    if proto == ipp.PROTO_TCP or proto == ipp.PROTO_UDP:
        return p.sport, p.dport, False
    if p.is_icmp_echo:
        i = p.icmp_id
        return i, i, True
    return 0, 0, False


@dataclass(slots=True)
class _Query:
    domain: str
    deadline: float
    waiters: list[tuple[str, str, str, list[bytes]]] = field(default_factory=list)


class GatewayState:
    """Everything ``fz gateway up`` decides per packet; see the module docstring."""

    def __init__(self, *, now: float, unix_time: float, rng: Rng) -> None:
        self._now0 = now
        self._unix0 = unix_time
        self._rng = rng
        self._clients: dict[str, _Client] = {}
        self._flows_out: dict[tuple[Any, ...], _Flow] = {}
        self._flows_in: dict[tuple[Any, ...], _Flow] = {}
        # Non-first fragments carry no ports: they follow the latest flow between the same two hosts.
        self._frags_out: dict[tuple[Any, ...], _Flow] = {}
        self._frags_in: dict[tuple[Any, ...], _Flow] = {}
        self._tunnel_out: deque[tuple[str, bytes]] = deque()
        self._events: deque[GatewayEvent] = deque()
        self._dns_out: deque[DnsQuery] = deque()
        self._queries: dict[int, _Query] = {}
        self._query_by_domain: dict[str, int] = {}
        self._next_query_id = 1
        self._dns_cache: dict[str, tuple[list[bytes], float]] = {}
        self._next_sweep: float | None = None
        self._auth_deadline: float | None = None
        self._auth_dirty = False
        self.counters: dict[str, int] = {}

    # --- helpers ---------------------------------------------------------------------------------
    def _count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    def _unix(self, now: float) -> float:
        return self._unix0 + (now - self._now0)

    def _arm_sweep(self, at: float) -> None:
        if self._next_sweep is None or at < self._next_sweep:
            self._next_sweep = at

    # --- portal commands -------------------------------------------------------------------------
    def add_authorization(
        self, client: ClientInfo, resource: dict[str, Any], expires_at: float | None, now: float
    ) -> None:
        """Let ``client`` reach ``resource`` until the UNIX time ``expires_at`` (None = no expiry)."""
        try:
            r = parse_resource(resource)
        except (KeyError, ValueError, TypeError) as e:
            raise GatewayError(f"malformed resource: {e}") from e
        c = self._clients.get(client.id)
        if c is None:
            ips = tuple(ipp.addr_bytes(a) for a in (client.ipv4, client.ipv6) if a is not None)
            c = self._clients[client.id] = _Client(client, ips)
        elif c.info != client:
            self._rebind_client(c, client)
        deadline = None if expires_at is None else now + (float(expires_at) - self._unix(now))
        c.auths[r.id] = _Auth(r, deadline)
        self._auth_dirty = True
        # Even a new resource can change verdicts: a longer prefix now decides for its addresses.
        self._revalidate(c, r.id, now)
        log.debug("authorization added", extra={"client_id": client.id, "resource_id": r.id})

    def _rebind_client(self, c: _Client, info: ClientInfo) -> None:
        ips = tuple(ipp.addr_bytes(a) for a in (info.ipv4, info.ipv6) if a is not None)
        if ips != c.ips:
            self._drop_flows(lambda f: f.client is c, "client_changed", None)
            c.ips = ips
        c.info = info

    def remove_authorization(self, client_id: str, resource_id: str, now: float) -> None:
        """``reject_access``: the client loses the resource at once, flows included."""
        c = self._clients.get(client_id)
        if c is None or c.auths.pop(resource_id, None) is None:
            return
        self._auth_dirty = True
        self._forget_resource(c, resource_id, now, "access_removed")
        log.debug(
            "authorization removed", extra={"client_id": client_id, "resource_id": resource_id}
        )
        self._maybe_ended(c)

    def _forget_resource(self, c: _Client, rid: str, now: float, reason: str) -> None:
        for proxy in [k for k, v in c.proxies.items() if v.resource_id == rid]:
            del c.proxies[proxy]
        self._drop_flows(lambda f: f.client is c and f.resource_id == rid, reason, now)

    def _maybe_ended(self, c: _Client) -> None:
        if not c.auths:
            self._events.append(ClientAccessEnded(c.info.id))

    def update_resource(self, resource: dict[str, Any], now: float) -> None:
        """``resource_updated``: new filters (or address) apply to every client and existing flow."""
        try:
            r = parse_resource(resource)
        except (KeyError, ValueError, TypeError) as e:
            raise GatewayError(f"malformed resource: {e}") from e
        for c in self._clients.values():
            a = c.auths.get(r.id)
            if a is not None:
                a.resource = r
                self._revalidate(c, r.id, now)

    def _revalidate(self, c: _Client, rid: str, now: float) -> None:
        r = c.auths[rid].resource
        if r.type == "dns":
            pat = r.pattern
            for proxy in [
                k
                for k, v in c.proxies.items()
                if v.resource_id == rid and not (pat is not None and pat.matches(v.domain))
            ]:
                del c.proxies[proxy]
        else:
            for proxy in [k for k, v in c.proxies.items() if v.resource_id == rid]:
                del c.proxies[proxy]
        self._drop_flows(
            lambda f: (
                f.client is c and self._route(c, f.proto, f.dst, f.dport) != (f.resource_id, "ok")
            ),
            "access_changed",
            now,
        )

    def remove_client(self, client_id: str, now: float) -> None:
        """Forget the client entirely (its connection is gone)."""
        c = self._clients.pop(client_id, None)
        if c is None:
            return
        self._auth_dirty = True
        self._drop_flows(lambda f: f.client is c, "client_removed", now)
        for q in self._queries.values():
            q.waiters = [w for w in q.waiters if w[0] != client_id]

    def authorized_resources(self, client_id: str) -> list[str]:
        c = self._clients.get(client_id)
        return sorted(c.auths) if c is not None else []

    @property
    def client_ids(self) -> list[str]:
        return sorted(self._clients)

    @property
    def flow_count(self) -> int:
        return len(self._flows_out)

    # --- decisions -------------------------------------------------------------------------------
    def _route(self, c: _Client, proto: int, dst: bytes, dport: int) -> tuple[str | None, str]:
        """(resource id, verdict) for a new flow: verdict "ok", "prohibited" or "unreachable"."""
        px = c.proxies.get(dst)
        if px is not None:
            a = c.auths.get(px.resource_id)
            if a is None:
                return None, "prohibited"
            if not a.resource.filter.allows(proto, dport):
                return px.resource_id, "prohibited"
            if px.real is None:
                return px.resource_id, "unreachable"
            return px.resource_id, "ok"
        best: _Resource | None = None
        best_len = -1
        for a in c.auths.values():
            r = a.resource
            if r.type == "dns":
                continue
            n = r.contains(dst)
            if n > best_len:
                best, best_len = r, n
        if best is None:
            return None, "prohibited"
        if not best.filter.allows(proto, dport):
            return best.id, "prohibited"
        return best.id, "ok"

    # --- packets from the tunnel -----------------------------------------------------------------
    def handle_tunnel_packet(self, client_id: str, packet: bytes, now: float) -> bytes | None:
        """A packet the client sent: the (translated) packet for the TUN, or None when refused/consumed."""
        if len(packet) >= 40 and packet[6] == ipp.PROTO_P2P_CONTROL and packet[0] >> 4 == 6:
            ctl = ipp.parse_p2p_control(packet)
            if ctl is not None:
                self._on_control(client_id, ctl[0], ctl[1], now)
                return None
        p = ipp.parse(packet)
        if p is None:
            self._count("tunnel_malformed")
            return None
        c = self._clients.get(client_id)
        if c is None:
            self._count("tunnel_unknown_client")
            return None
        src = p.src
        if src not in c.ips:
            self._count("tunnel_spoofed_source")
            return None
        ports = _ports(p)
        if ports is None:
            return self._tunnel_fragment(client_id, p, now)
        sport, dport, icmp = ports
        proto = p.proto
        dst = p.dst
        flow = self._flows_out.get((client_id, proto, src, sport, dst, dport))
        if flow is None:
            flow = self._new_flow(c, p, proto, src, sport, dst, dport, icmp, now)
            if flow is None:
                return None
        if flow.nat:
            p.set_dst(flow.out_dst)
            if flow.out_port != sport:
                if icmp:
                    p.set_icmp_id(flow.out_port)
                else:
                    p.set_sport(flow.out_port)
        flow.rx_bytes += p.end
        flow.rx_packets += 1
        flow.last_seen = now
        if proto == ipp.PROTO_TCP:
            self._tcp_flags(flow, p.tcp_flags, True, now)
        if log.isEnabledFor(TRACE):
            log.log(TRACE, "tunnel -> tun", extra={"client_id": client_id, "packet": repr(p)})
        return bytes(p.buf[: p.end]) if p.end != len(p.buf) or flow.nat else packet

    def _tunnel_fragment(self, client_id: str, p: ipp.Packet, now: float) -> bytes | None:
        """A non-first fragment from the client: allowed only after its first fragment made a flow."""
        flow = self._frags_out.get((client_id, p.proto, p.src, p.dst))
        if flow is None:
            self._count("tunnel_fragment_without_flow")
            return None
        if flow.nat:
            p.set_dst(flow.out_dst)
        flow.rx_bytes += p.end
        flow.rx_packets += 1
        flow.last_seen = now
        return bytes(p.buf[: p.end])

    def _tun_fragment(self, p: ipp.Packet, now: float) -> tuple[str, bytes] | None:
        flow = self._frags_in.get((p.proto, p.src, p.dst))
        if flow is None:
            self._count("tun_fragment_without_flow")
            return None
        if flow.nat:
            p.set_src(flow.dst)
        flow.tx_bytes += p.end
        flow.tx_packets += 1
        flow.last_seen = now
        return flow.client.info.id, bytes(p.buf[: p.end])

    def _new_flow(
        self,
        c: _Client,
        p: ipp.Packet,
        proto: int,
        src: bytes,
        sport: int,
        dst: bytes,
        dport: int,
        icmp: bool,
        now: float,
    ) -> _Flow | None:
        if p.is_icmp_error:
            # Errors the client sends about inbound traffic: there is none to report on.
            self._count("tunnel_icmp_error_dropped")
            return None
        rid, verdict = self._route(c, proto, dst, dport)
        if verdict != "ok":
            self._count(f"tunnel_{verdict}")
            err = (
                ipp.icmp_prohibited(p) if verdict == "prohibited" else ipp.icmp_host_unreachable(p)
            )
            if err is not None:
                self._tunnel_out.append((c.info.id, err))
            log.debug(
                "packet refused",
                extra={"client_id": c.info.id, "resource_id": rid, "verdict": verdict},
            )
            return None
        assert rid is not None
        px = c.proxies.get(dst)
        domain: str | None = None
        out_dst, out_port = dst, sport
        if px is not None:
            if proto not in (ipp.PROTO_TCP, ipp.PROTO_UDP) and not icmp:
                self._count("tunnel_prohibited")
                err = ipp.icmp_prohibited(p)
                if err is not None:
                    self._tunnel_out.append((c.info.id, err))
                return None
            assert px.real is not None
            domain, out_dst = px.domain, px.real
            free = self._free_port(proto, icmp, out_dst, dport, src, sport)
            if free is None:
                self._count("nat_ports_exhausted")
                return None
            out_port = free
        elif self._flows_in.get(_in_key(proto, icmp, dst, dport, src, sport)) is not None:
            # A translated flow already owns this outside tuple; this direct one cannot share it.
            self._count("nat_collision_dropped")
            return None
        flow = _Flow(
            c,
            rid,
            domain,
            proto,
            icmp,
            src,
            sport,
            dst,
            dport,
            out_dst,
            out_port,
            now,
            self._unix(now),
        )
        self._flows_out[flow.out_key] = flow
        self._flows_in[flow.in_key] = flow
        self._frags_out[(c.info.id, proto, src, dst)] = flow
        self._frags_in[(proto, out_dst, src)] = flow
        self._arm_sweep(now + UNANSWERED_TTL)
        self._events.append(
            FlowStarted(
                c.info.id,
                c.info.user,
                rid,
                domain,
                PROTO_NAMES.get(proto, str(proto)),
                ipp.addr_str(src),
                sport,
                ipp.addr_str(dst),
                dport,
                ipp.addr_str(out_dst),
                flow.started_unix,
            )
        )
        log.debug(
            "flow started", extra={"client_id": c.info.id, "resource_id": rid, "domain": domain}
        )
        return flow

    def _free_port(
        self, proto: int, icmp: bool, remote: bytes, rport: int, client_ip: bytes, start: int
    ) -> int | None:
        """firezone-notes §3.5: the first free outside port at or above the inside one (wrapping)."""
        port = start
        lo = 0 if icmp else 1
        for _ in range(65536):
            if self._flows_in.get(_in_key(proto, icmp, remote, rport, client_ip, port)) is None:
                return port
            port = port + 1 if port < 65535 else lo
        return None

    def _tcp_flags(self, flow: _Flow, flags: int, from_client: bool, now: float) -> None:
        if flags & ipp.TCP_RST:
            flow.closing_at = now
            self._arm_sweep(now)
            return
        if flags & ipp.TCP_FIN:
            if from_client:
                flow.fin_rx = True
            else:
                flow.fin_tx = True
            if flow.fin_rx and flow.fin_tx and flow.closing_at is None:
                flow.closing_at = now + FIN_LINGER
                self._arm_sweep(flow.closing_at)

    # --- p2p control -----------------------------------------------------------------------------
    def _on_control(self, client_id: str, kind: int, body: bytes, now: float) -> None:
        c = self._clients.get(client_id)
        if c is None:
            self._count("control_unknown_client")
            return
        if kind == ipp.P2P_GOODBYE:
            log.debug("client said goodbye", extra={"client_id": client_id})
            self._count("control_goodbye")
            return
        if kind != ipp.P2P_ASSIGNED_IPS:
            self._count("control_ignored")
            return
        try:
            msg = json.loads(body)
            rid = str(msg["resource"])
            domain = normalize_name(str(msg["domain"]))
            proxies = [ipp.addr_bytes(str(a)) for a in msg["proxy_ips"]]
        except (ValueError, KeyError, TypeError):
            self._count("control_malformed")
            return
        if (
            not proxies
            or len(proxies) > MAX_PROXY_IPS
            or not all(
                ipaddress.ip_address(a) in (PROXY_V4 if len(a) == 4 else PROXY_V6) for a in proxies
            )
        ):
            self._count("control_bad_proxy_ips")
            return
        a = c.auths.get(rid)
        if (
            a is None
            or a.resource.type != "dns"
            or a.resource.pattern is None
            or not a.resource.pattern.matches(domain)
        ):
            self._count("control_not_authorized")
            log.debug(
                "assigned IPs for an unauthorized name",
                extra={"client_id": client_id, "resource_id": rid},
            )
            return
        cached = self._dns_cache.get(domain)
        if cached is not None and cached[1] > now:
            self._map(c, rid, domain, proxies, cached[0])
            return
        qid = self._query_by_domain.get(domain)
        if qid is None:
            qid = self._next_query_id
            self._next_query_id += 1
            self._queries[qid] = _Query(domain, now + DNS_TIMEOUT)
            self._query_by_domain[domain] = qid
            self._dns_out.append(DnsQuery(qid, domain))
        self._queries[qid].waiters.append((client_id, rid, domain, proxies))

    def _map(
        self, c: _Client, rid: str, domain: str, proxies: list[bytes], addrs: list[bytes]
    ) -> None:
        """Map each proxy IP to a real IP of its family, round robin (firezone-notes §3.5)."""
        v4 = [a for a in addrs if len(a) == 4]
        v6 = [a for a in addrs if len(a) == 16]
        i4 = i6 = 0
        for proxy in proxies:
            if len(proxy) == 4:
                real = v4[i4 % len(v4)] if v4 else None
                i4 += 1
            else:
                real = v6[i6 % len(v6)] if v6 else None
                i6 += 1
            c.proxies[proxy] = _Proxy(rid, domain, real)
        status = "active" if addrs else "inactive"
        body = json.dumps(
            {"resource": rid, "domain": domain, "status": status}, separators=(",", ":")
        ).encode()
        self._tunnel_out.append((c.info.id, ipp.build_p2p_control(ipp.P2P_DOMAIN_STATUS, body)))
        log.debug(
            "domain mapped",
            extra={"client_id": c.info.id, "domain": domain, "addresses": len(addrs)},
        )

    def handle_dns_result(
        self, query_id: int, addresses: list[str] | None, ttl: float | None, now: float
    ) -> None:
        """The answer to a ``DnsQuery``: A and AAAA addresses, or None when resolution failed."""
        q = self._queries.pop(query_id, None)
        if q is None:
            self._count("dns_result_unknown")
            return
        if self._query_by_domain.get(q.domain) == query_id:
            del self._query_by_domain[q.domain]
        addrs: list[bytes] = []
        for a in addresses or ():
            try:
                addrs.append(ipp.addr_bytes(str(a)))
            except ValueError:
                self._count("dns_bad_address")
        if addrs:
            self._dns_cache[q.domain] = (
                addrs,
                now + (DNS_CACHE_TTL if ttl is None else max(0.0, float(ttl))),
            )
        else:
            self._count("dns_failed")
            log.debug("name did not resolve", extra={"domain": q.domain})
        self._resolved(q, addrs)

    def _resolved(self, q: _Query, addrs: list[bytes]) -> None:
        for client_id, rid, domain, proxies in q.waiters:
            c = self._clients.get(client_id)
            if c is None or rid not in c.auths:
                continue
            self._map(c, rid, domain, proxies, addrs)

    # --- packets from the TUN --------------------------------------------------------------------
    def handle_tun_packet(self, packet: bytes, now: float) -> tuple[str, bytes] | None:
        """A packet from the TUN for a client: (client id, packet translated back) or None."""
        p = ipp.parse(packet)
        if p is None:
            self._count("tun_malformed")
            return None
        ports = _ports(p)
        if ports is None:
            return self._tun_fragment(p, now)
        sport, dport, icmp = ports
        proto = p.proto
        flow = self._flows_in.get((proto, p.src, sport, p.dst, dport))
        if flow is None:
            if p.is_icmp_error:
                return self._tun_icmp_error(p, now)
            self._count("tun_no_flow")
            return None
        if flow.nat:
            p.set_src(flow.dst)
            if flow.out_port != flow.sport:
                if icmp:
                    p.set_icmp_id(flow.sport)
                else:
                    p.set_dport(flow.sport)
        flow.tx_bytes += p.end
        flow.tx_packets += 1
        flow.last_seen = now
        flow.answered = True
        if proto == ipp.PROTO_TCP:
            self._tcp_flags(flow, p.tcp_flags, False, now)
        if log.isEnabledFor(TRACE):
            log.log(
                TRACE, "tun -> tunnel", extra={"client_id": flow.client.info.id, "packet": repr(p)}
            )
        if not flow.nat and p.end == len(packet) and isinstance(packet, bytes):
            return flow.client.info.id, packet
        return flow.client.info.id, bytes(p.buf[: p.end])

    def _tun_icmp_error(self, p: ipp.Packet, now: float) -> tuple[str, bytes] | None:
        """An ICMP error about a packet of one of our flows: translate the quote and the outer source."""
        q = p.icmp_quoted()
        if q is None or q.l4 < 0 or q.version != p.version:
            self._count("tun_no_flow")
            return None
        if q.proto in (ipp.PROTO_TCP, ipp.PROTO_UDP):
            qs, qd, icmp = q.sport, q.dport, False
        elif q.is_icmp and q.l4 + 8 <= len(q.buf) and q.is_icmp_echo:
            qs = qd = q.icmp_id
            icmp = True
        else:
            self._count("tun_no_flow")
            return None
        # The quote is our outbound packet: client -> remote; its reverse key finds the flow.
        flow = self._flows_in.get(_in_key(q.proto, icmp, q.dst, qd, q.src, qs))
        if flow is None or p.dst != flow.src:
            self._count("tun_no_flow")
            return None
        if flow.nat:
            outer_from_remote = p.src == flow.out_dst
            q.set_dst(flow.dst)
            if flow.out_port != flow.sport:
                if icmp:
                    q.set_icmp_id(flow.sport)
                else:
                    q.set_sport(flow.sport)
            start = p.l4 + 8
            p.buf[start : start + len(q.buf)] = q.buf
            if outer_from_remote:
                p.set_src(flow.dst)
            p.recompute_checksums()
        flow.tx_bytes += p.end
        flow.tx_packets += 1
        return flow.client.info.id, bytes(p.buf[: p.end])

    # --- timers ----------------------------------------------------------------------------------
    def _refresh_auth_deadline(self) -> None:
        if self._auth_dirty:
            self._auth_dirty = False
            self._auth_deadline = min(
                (
                    a.expires_at
                    for c in self._clients.values()
                    for a in c.auths.values()
                    if a.expires_at is not None
                ),
                default=None,
            )

    def poll_timeout(self) -> float | None:
        """The next deadline at which ``handle_timeout`` has work, or None."""
        self._refresh_auth_deadline()
        t = self._next_sweep
        if self._auth_deadline is not None and (t is None or self._auth_deadline < t):
            t = self._auth_deadline
        for q in self._queries.values():
            if t is None or q.deadline < t:
                t = q.deadline
        return t

    def handle_timeout(self, now: float) -> None:
        """Expire authorizations, DNS queries and idle or closed flows due at ``now``."""
        self._refresh_auth_deadline()
        due = self._auth_deadline is not None and self._auth_deadline <= now
        for c in list(self._clients.values()) if due else ():
            expired = [
                rid
                for rid, a in c.auths.items()
                if a.expires_at is not None and a.expires_at <= now
            ]
            for rid in expired:
                del c.auths[rid]
                self._auth_dirty = True
                self._forget_resource(c, rid, now, "access_expired")
                self._events.append(AccessExpired(c.info.id, rid))
                log.debug(
                    "authorization expired", extra={"client_id": c.info.id, "resource_id": rid}
                )
            if expired:
                self._maybe_ended(c)
        for qid in [qid for qid, q in self._queries.items() if q.deadline <= now]:
            q = self._queries.pop(qid)
            if self._query_by_domain.get(q.domain) == qid:
                del self._query_by_domain[q.domain]
            self._count("dns_timeout")
            self._resolved(q, [])
        for domain in [d for d, (_, exp) in self._dns_cache.items() if exp <= now]:
            del self._dns_cache[domain]
        if self._next_sweep is not None and self._next_sweep <= now:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        nxt: float | None = None
        dead: list[_Flow] = []
        for f in self._flows_out.values():
            d = f.deadline()
            if d <= now:
                dead.append(f)
            elif nxt is None or d < nxt:
                nxt = d
        for f in dead:
            self._end_flow(f, now, "closed" if f.closing_at is not None else "idle")
        self._next_sweep = None if nxt is None else max(nxt, now + SWEEP_INTERVAL)

    def _drop_flows(self, pred: Any, reason: str, now: float | None) -> None:
        for f in [f for f in self._flows_out.values() if pred(f)]:
            self._end_flow(f, f.last_seen if now is None else now, reason)

    def _end_flow(self, f: _Flow, now: float, reason: str) -> None:
        self._flows_out.pop(f.out_key, None)
        if self._flows_in.get(f.in_key) is f:
            del self._flows_in[f.in_key]
        k = (f.client.info.id, f.proto, f.src, f.dst)
        if self._frags_out.get(k) is f:
            del self._frags_out[k]
        k2 = (f.proto, f.out_dst, f.src)
        if self._frags_in.get(k2) is f:
            del self._frags_in[k2]
        info = f.client.info
        ev = FlowCompleted(
            info.id,
            info.user,
            f.resource_id,
            f.domain,
            PROTO_NAMES.get(f.proto, str(f.proto)),
            ipp.addr_str(f.src),
            f.sport,
            ipp.addr_str(f.dst),
            f.dport,
            ipp.addr_str(f.out_dst),
            f.started_unix,
            self._unix(now),
            f.rx_bytes,
            f.tx_bytes,
            f.rx_packets,
            f.tx_packets,
            reason,
        )
        self._events.append(ev)
        if flow_log.isEnabledFor(logging.INFO):
            flow_log.info(
                "%s flow completed",
                ev.protocol.upper(),
                extra={
                    "client_id": ev.client_id,
                    "user": ev.user,
                    "resource_id": ev.resource_id,
                    "domain": ev.domain,
                    "inner_src_ip": ev.src_ip,
                    "inner_src_port": ev.src_port,
                    "inner_dst_ip": ev.dst_ip,
                    "inner_dst_port": ev.dst_port,
                    "real_dst_ip": ev.real_dst_ip,
                    "rx_bytes": ev.rx_bytes,
                    "tx_bytes": ev.tx_bytes,
                    "rx_packets": ev.rx_packets,
                    "tx_packets": ev.tx_packets,
                    "reason": reason,
                },
            )

    # --- outputs ---------------------------------------------------------------------------------
    def poll_tunnel_packet(self) -> tuple[str, bytes] | None:
        """The next packet for a client's tunnel (ICMP errors, DomainStatus), or None."""
        return self._tunnel_out.popleft() if self._tunnel_out else None

    def poll_dns_query(self) -> DnsQuery | None:
        """The next name to resolve, or None."""
        return self._dns_out.popleft() if self._dns_out else None

    def poll_event(self) -> GatewayEvent | None:
        return self._events.popleft() if self._events else None
