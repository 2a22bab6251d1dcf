"""Reference-model state machine: one ClientState and its gateway (GatewayState + Node), end to end.

The world (``client_gateway_world``) runs the real client and gateway cores over a real ICE +
WireGuard tunnel on an instant in-memory network; the portal and the resource network are played
by the test. Rules: add / remove CIDR and DNS resources, change their filters, add / remove the
policy (``allow``, or ``forbidden`` = a policy whose conditions fail), take the site offline (in
the portal's view) and back, change a DNS record, query
the client's stub, send TCP / UDP / ICMP echo from the application to a CIDR address or to a proxy
IP the stub returned, let the resource answer on a flow, let the portal answer, advance time.

The reference model is plain Python: which resources exist and with which filters, which are
visible to the client and with which policy, the authorizations the portal granted (and when they
expire), which proxy IPs stand for which name, what the gateway's resolver cache holds (30 s),
which proxy IP the gateway maps to which real IP, and the gateway's flows (NAT port, idle
deadlines). After every step, every observation is checked against it:

* a packet the model allows arrives exactly once on the resource network, at the real address
  (DNS resources: the name's address as the gateway resolved it), from the client's tunnel IP,
  with its ports (DNS NAT may remap the source port, but consistently per flow and never onto a
  port another live flow to the same destination uses) and payload intact;
* a packet the gateway refuses produces exactly one ICMP error to the application and nothing
  on the resource network: "administratively prohibited" (3/13, ICMPv6 1/1) when no authorized
  resource or its filter allows it, "host unreachable" (3/1, ICMPv6 1/3) when the name has no
  address of that family; a packet to a resource whose policy fails is answered by the client
  itself with "administratively prohibited" once the portal refuses, and with "host unreachable"
  when the portal finds no gateway of the site online;
* a packet to no resource (or one whose resource disappears while it waits) is dropped silently;
* while authorization is in flight packets wait, and once time has moved on nothing waits any more;
* a reply from the resource on a live flow reaches the application exactly once, translated back
  to the address and ports the application used; a reply on a flow the gateway has dropped
  (idle, access removed or expired, filter changed) reaches nobody;
* the stub answers a resource name with 4 stable proxy IPs of the family and forwards the rest;
* the gateway asks its resolver only when its 30 s cache has no answer;
* the client never calls the (live, instantly reachable) gateway silent.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

import dns.message
import dns.rdatatype
from hypothesis import HealthCheck, settings
from hypothesis import event as hypothesis_event
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from firezone.proto import ip as ipp
from firezone.proto.client import ConnectionDown, ConnectionUp, GatewaySilent
from firezone.proto.dns.stub import Answer, Forward
from firezone.proto.gateway import DNS_CACHE_TTL, ICMP_TTL, TCP_TTL, UDP_TTL, UNANSWERED_TTL
from tests.stateful.client_gateway_world import (
    CLIENT_V4,
    CLIENT_V6,
    SITE,
    UNIX0,
    UPSTREAM,
    Grant,
    World,
)

# An authorization lasts this long; off the grid of the time steps so no step lands on an expiry.
AUTH_TTL = 89.987
# The gateway sweeps idle flows at most once a second: a flow dies within this after its deadline.
SWEEP_SLACK = 1.01

CIDRS = {
    "r-net": "198.51.100.0/24",
    "r-host": "198.51.100.7/32",
    "r-v6": "2001:db8:51::/64",
}
PATTERNS = {
    "r-app": "**.app.test",
    "r-a": "a.app.test",
    "r-svc": "*.svc.test",
}
RESOURCE_IDS = sorted(CIDRS) + sorted(PATTERNS)
# Query names and the DNS resources matching them, most specific first.
NAMES: dict[str, list[str]] = {
    "a.app.test": ["r-a", "r-app"],
    "b.x.app.test": ["r-app"],
    "app.test": ["r-app"],
    "gone.app.test": ["r-app"],
    "web.svc.test": ["r-svc"],
    "svc.test": ["r-svc"],
    "deep.web.svc.test": [],
    "example.org": [],
}
# What the gateway's resolver answers; two names share one address; gone.app.test has none.
RECORDS0: dict[str, list[str]] = {
    "a.app.test": ["203.0.113.10"],
    "b.x.app.test": ["203.0.113.10"],
    "app.test": ["203.0.113.11", "2001:db8:113::11"],
    "web.svc.test": ["203.0.113.20", "203.0.113.21", "2001:db8:113::20"],
    "svc.test": ["203.0.113.22"],
}
RECORD_CHOICES = ["203.0.113.10", "203.0.113.30", "2001:db8:113::30"]
CIDR_TARGETS = ["198.51.100.7", "198.51.100.20", "2001:db8:51::5", "192.0.2.99"]
PORTS = [53, 80, 443, 8080]
SPORTS = [40000, 40001]
FILTERS: list[list[dict[str, Any]]] = [
    [],
    [{"protocol": "tcp", "port_range_start": 80, "port_range_end": 80}],
    [
        {"protocol": "tcp", "port_range_start": 443, "port_range_end": 8080},
        {"protocol": "udp", "port_range_start": 53, "port_range_end": 53},
    ],
    [{"protocol": "icmp"}],
    [
        {"protocol": "udp", "port_range_start": 0, "port_range_end": 65535},
        {"protocol": "icmp"},
    ],
]
PROTO_NUM = {"tcp": ipp.PROTO_TCP, "udp": ipp.PROTO_UDP}


def event(text: str) -> None:
    """Count an outcome in hypothesis' statistics (a no-op when the machine is driven by hand)."""
    try:
        hypothesis_event(text)
    except InvalidArgument:
        pass


def allows(filters: list[dict[str, Any]], proto: str, port: int) -> bool:
    if not filters:
        return True
    for f in filters:
        if f["protocol"] == proto == "icmp":
            return True
        if f["protocol"] == proto and f["port_range_start"] <= port <= f["port_range_end"]:
            return True
    return False


def longest_prefix(dst: str, resource_ids: list[str]) -> str | None:
    """The CIDR resource among ``resource_ids`` with the longest prefix containing ``dst``."""
    addr = ipaddress.ip_address(dst)
    inside = []
    for rid in resource_ids:
        net = ipaddress.ip_network(CIDRS[rid])
        if net.version == addr.version and addr in net:
            inside.append((net.prefixlen, rid))
    return max(inside)[1] if inside else None


def family(addr: str) -> int:
    return ipaddress.ip_address(addr).version


def icmp_codes(kind: str, version: int) -> tuple[int, int]:
    if kind == "prohibited":
        return (3, 13) if version == 4 else (1, 1)
    return (3, 1) if version == 4 else (1, 3)


@dataclass
class Sent:
    """One packet the application wrote, and what became of it."""

    token: bytes
    t: float
    packet: bytes
    dst: str  # as the application addressed it (a CIDR address or a proxy IP)
    proto: str  # tcp | udp | icmp
    sport: int  # ICMP: the echo identifier
    dport: int  # ICMP: the echo identifier
    name: str | None
    rid: str | None  # the client's route when it was sent
    state: str = "pending"  # pending | stale | done | dropped

    @property
    def key(self) -> tuple[str, str, int, int]:
        return (self.proto, self.dst, self.sport, self.dport)

    @property
    def src(self) -> str:
        return CLIENT_V4 if family(self.dst) == 4 else CLIENT_V6


@dataclass
class Flow:
    """A gateway flow as the model knows it (keyed by the application's 5-tuple)."""

    rid: str
    real: str
    out_port: int
    nat: bool
    last_seen: float
    answered: bool = False
    killed_at: float | None = None

    def deadline(self, proto: str) -> float:
        if not self.answered:
            return self.last_seen + UNANSWERED_TTL
        return self.last_seen + {"tcp": TCP_TTL, "udp": UDP_TTL, "icmp": ICMP_TTL}[proto]

    def status(self, proto: str, t: float) -> str:
        if self.killed_at is not None and self.killed_at <= t:
            return "dead"
        d = self.deadline(proto)
        if t < d:
            return "alive"
        return "dead" if t >= d + SWEEP_SLACK else "uncertain"


@dataclass
class Reply:
    token: bytes
    sent_key: tuple[str, str, int, int]
    expect: str  # "yes" | "no" | "maybe" (the client's side of the tunnel is being rebuilt)
    state: str = "pending"


class ClientGatewayModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.w = World(auth_ttl=AUTH_TTL)
        self.g = self.w.gateways["gw1"]
        # reference model
        self.resources: dict[str, list[dict[str, Any]]] = {}
        self.policies: dict[str, str] = {}
        self.records: dict[str, list[str]] = {k: list(v) for k, v in RECORDS0.items()}
        self.w.records = {k: list(v) for k, v in RECORDS0.items()}
        self.answers: dict[str, dict[int, list[str]]] = {}
        self.proxy_owner: dict[str, str] = {}
        self.revokes: list[tuple[float, str, int]] = []  # (time, resource, grants made before)
        self.cache: dict[str, tuple[list[str], float]] = {}
        self.expected_queries = 0
        self.gw_proxy: dict[str, tuple[str, str, str | None]] = {}  # proxy -> (rid, name, real)
        self.flows: dict[tuple[str, str, int, int], Flow] = {}
        self.sent: dict[bytes, Sent] = {}
        self.replies: dict[bytes, Reply] = {}
        self.counter = 0
        # observation cursors
        self.seen_grants = 0
        self.seen_assigned = 0
        self.seen_arrivals = 0
        self.seen_app = 0
        self.expired: set[int] = set()  # ids of grants whose expiry was applied

    # --- model helpers ---------------------------------------------------------------------------
    def visible(self, rid: str) -> bool:
        return rid in self.resources and rid in self.policies

    def name_resource(self, name: str) -> str | None:
        return next((r for r in NAMES[name] if self.visible(r)), None)

    def client_route(self, dst: str, name: str | None) -> str | None:
        if name is not None:
            return self.name_resource(name)
        return longest_prefix(dst, [r for r in CIDRS if self.visible(r)])

    def grant_active(self, rid: str, t: float) -> Grant | None:
        """The grant the gateway holds for ``rid`` at ``t`` (after revocations and expiry)."""
        last = None
        for i, gr in enumerate(self.w.grants):
            if gr.resource_id == rid and gr.at <= t:
                last = i
        if last is None or UNIX0 + t >= self.w.grants[last].expires_at:
            return None
        # A revocation recorded after that grant was made (in program order) ends it.
        if any(r == rid and n > last and tr <= t for tr, r, n in self.revokes):
            return None
        return self.w.grants[last]

    def tunnel_up(self) -> bool:
        """Whether the client's connection to the gateway is up (its latest report)."""
        for e in reversed(self.w.events):
            if isinstance(e, ConnectionUp | ConnectionDown):
                return isinstance(e, ConnectionUp)
        return False

    def last_decision(self, rid: str, t: float) -> str | None:
        """The portal's latest answer about ``rid`` up to ``t``."""
        return next((d for td, r, d in reversed(self.w.decisions) if r == rid and td <= t), None)

    def gw_route(
        self, proto: str, dst: str, port: int, t: float
    ) -> tuple[str, str | None, str | None]:
        """The gateway's verdict for a new flow: (ok|prohibited|unreachable, resource, real IP)."""
        px = self.gw_proxy.get(dst)
        if px is not None:
            rid, _name, real = px
            if self.grant_active(rid, t) is None or not allows(self.resources[rid], proto, port):
                return "prohibited", rid, None
            if real is None:
                return "unreachable", rid, None
            return "ok", rid, real
        best = longest_prefix(dst, [r for r in CIDRS if self.grant_active(r, t) is not None])
        if best is None:
            return "prohibited", None, None
        if not allows(self.resources[best], proto, port):
            return "prohibited", best, None
        return "ok", best, dst

    def kill_flows(self, t: float, pred: Any) -> None:
        for key, f in self.flows.items():
            if f.killed_at is None and f.status(key[0], t) != "dead" and pred(key, f):
                f.killed_at = t

    def forget_resource(self, rid: str, t: float) -> None:
        """The gateway lost ``rid`` for the client: its proxies and flows are gone."""
        self.kill_flows(t, lambda _k, f: f.rid == rid)
        for p in [p for p, v in self.gw_proxy.items() if v[0] == rid]:
            del self.gw_proxy[p]
        if not any(self.grant_active(r, t) for r in RESOURCE_IDS):
            # ClientAccessEnded: the gateway forgets the client altogether.
            self.gw_proxy.clear()
            self.kill_flows(t, lambda _k, _f: True)

    def revalidate(self, t: float) -> None:
        """GatewayState._revalidate: flows whose verdict changed are dropped."""

        def changed(key: tuple[str, str, int, int], f: Flow) -> bool:
            verdict, rid, _ = self.gw_route(key[0], key[1], key[3], t)
            return (verdict, rid) != ("ok", f.rid)

        self.kill_flows(t, changed)

    @staticmethod
    def pick(data: st.DataObject, preferred: list[Any], others: list[Any], label: str) -> Any:
        """Mostly one of ``preferred`` (the interesting choices), sometimes any."""
        if preferred and (not others or data.draw(st.integers(0, 9), label="odds") < 8):
            return data.draw(st.sampled_from(preferred), label=label)
        return data.draw(st.sampled_from(preferred + others), label=label)

    def new_token(self) -> bytes:
        self.counter += 1
        return b"fz-model-%06d" % self.counter

    # --- rules: portal side ----------------------------------------------------------------------
    def _full(self, rid: str, filters: list[dict[str, Any]]) -> dict[str, Any]:
        rtype = "cidr" if rid in CIDRS else "dns"
        address = CIDRS.get(rid) or PATTERNS[rid]
        return {
            "id": rid,
            "type": rtype,
            "name": rid,
            "address": address,
            "address_description": None,
            "filters": filters,
            "sites": [SITE],
        }

    def _visibility_changed(self, rid: str, was: bool) -> None:
        if was and not self.visible(rid):
            t = self.w.now
            self.revokes.append((t, rid, len(self.w.grants)))
            for s in self.sent.values():
                if s.state in ("pending", "stale") and s.rid == rid:
                    s.state = "dropped"  # the client forgets the resource and what waited for it
            self.forget_resource(rid, t)

    @initialize(
        cidr=st.sampled_from(sorted(CIDRS)),
        dns_rid=st.sampled_from(sorted(PATTERNS)),
        kinds=st.tuples(*[st.sampled_from(["allow", "allow", "forbidden", None])] * 2),
        filters=st.tuples(st.sampled_from(FILTERS), st.sampled_from(FILTERS)),
        names=st.lists(st.sampled_from(sorted(NAMES)), max_size=2),
        overlap=st.one_of(st.none(), st.sampled_from(FILTERS)),
    )
    def start(
        self,
        cidr: str,
        dns_rid: str,
        kinds: tuple[str | None, str | None],
        filters: tuple[list[dict[str, Any]], list[dict[str, Any]]],
        names: list[str],
        overlap: list[dict[str, Any]] | None,
    ) -> None:
        """A CIDR and a DNS resource exist (mostly with a policy) when the client signs in.

        With ``overlap``, the /32 inside the /24 is a resource of its own too (longest prefix wins).
        """
        for rid, kind, filt in zip((cidr, dns_rid), kinds, filters, strict=True):
            self._add_resource(rid, filt)
            if kind is not None:
                self._add_policy(rid, kind)
        if overlap is not None and cidr in ("r-net", "r-host"):
            other = "r-host" if cidr == "r-net" else "r-net"
            self._add_resource(other, overlap)
            self._add_policy(other, "allow")
        for name in names:
            self._dns_query(name, "A")

    def _add_resource(self, rid: str, filters: list[dict[str, Any]]) -> None:
        self.resources[rid] = filters
        self.w.put_resource(self._full(rid, filters))

    def _add_policy(self, rid: str, kind: str) -> None:
        self.policies[rid] = kind
        self.w.set_policy(rid, kind)

    @precondition(lambda self: len(self.resources) < len(RESOURCE_IDS))
    @rule(data=st.data(), filters=st.sampled_from(FILTERS))
    def add_resource(self, data: st.DataObject, filters: list[dict[str, Any]]) -> None:
        missing = [r for r in RESOURCE_IDS if r not in self.resources]
        self._add_resource(data.draw(st.sampled_from(missing), label="resource"), filters)

    @precondition(lambda self: len(self.resources) > 1)
    @rule(data=st.data())
    def remove_resource(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.resources)), label="resource")
        was = self.visible(rid)
        del self.resources[rid]
        self.w.delete_resource(rid)
        self._visibility_changed(rid, was)

    @precondition(lambda self: bool(self.resources))
    @rule(data=st.data(), filters=st.sampled_from(FILTERS))
    def change_filters(self, data: st.DataObject, filters: list[dict[str, Any]]) -> None:
        t = self.w.now
        granted = [r for r in sorted(self.resources) if self.grant_active(r, t) is not None]
        rid = self.pick(
            data, granted, [r for r in sorted(self.resources) if r not in granted], "resource"
        )
        if self.resources[rid] == filters:
            return
        self.resources[rid] = filters
        self.w.put_resource(self._full(rid, filters))
        if self.grant_active(rid, self.w.now) is not None:
            self.revalidate(self.w.now)

    @precondition(lambda self: len(self.policies) < len(RESOURCE_IDS))
    @rule(data=st.data(), kind=st.sampled_from(["allow", "allow", "forbidden"]))
    def add_policy(self, data: st.DataObject, kind: str) -> None:
        # Mostly for resources that exist, so that the policy makes a difference.
        missing = [r for r in RESOURCE_IDS if r not in self.policies]
        useful = [r for r in missing if r in self.resources] or missing
        self._add_policy(data.draw(st.sampled_from(useful), label="resource"), kind)

    @precondition(lambda self: len(self.policies) > 1)
    @rule(data=st.data())
    def remove_policy(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.policies)), label="resource")
        was = self.visible(rid)
        del self.policies[rid]
        self.w.set_policy(rid, None)
        self._visibility_changed(rid, was)

    @rule(name=st.sampled_from(sorted(RECORDS0)), addrs=st.sets(st.sampled_from(RECORD_CHOICES)))
    def change_record(self, name: str, addrs: set[str]) -> None:
        self.records[name] = sorted(addrs)
        self.w.records[name] = sorted(addrs)

    @precondition(lambda self: self.w.site_online)
    @rule()
    def site_goes_offline(self) -> None:
        """The portal loses the gateway's control channel until the next long step; the tunnel stays."""
        self.w.site_online = False

    @rule()
    def portal_answers(self) -> None:
        self.w.answer_portal()

    @rule(dt=st.sampled_from([0.5, 1.0, 2.5]))
    def advance_a_little(self, dt: float) -> None:
        self.advance(dt)

    @rule(dt=st.sampled_from([10.0, 31.0, 61.0, 95.0]))
    def advance_a_lot(self, dt: float) -> None:
        self.w.site_online = True
        self.advance(dt)

    def advance(self, dt: float) -> None:
        self.w.advance(dt)
        self.observe()
        for s in self.sent.values():
            if s.state == "stale":
                s.state = "dropped"
            assert s.state != "pending", (
                f"{s.proto} packet to {s.dst}:{s.dport} ({s.name}, {s.rid}) sent at {s.t} "
                f"neither arrived nor was refused by {self.w.now}"
            )
        for r in self.replies.values():
            if r.state == "pending" and r.expect != "yes":
                r.state = "dropped"

    # --- rules: application side -----------------------------------------------------------------
    @rule(data=st.data(), rdtype=st.sampled_from(["A", "A", "AAAA"]))
    def dns_query(self, data: st.DataObject, rdtype: str) -> None:
        names = sorted(NAMES)
        covered = [n for n in names if self.name_resource(n) is not None]
        name = self.pick(data, covered, [n for n in names if n not in covered], "name")
        self._dns_query(name, rdtype)

    def _dns_query(self, name: str, rdtype: str) -> None:
        result = self.w.dns(name, rdtype)
        rid = self.name_resource(name)
        if rid is None:
            assert isinstance(result, Forward), (name, result)
            assert result.upstream == UPSTREAM
            return
        assert isinstance(result, Answer), (name, result)
        msg = dns.message.from_wire(result.data)
        fam = 4 if rdtype == "A" else 6
        ips = [
            rr.address
            for rrset in msg.answer
            if rrset.rdtype == dns.rdatatype.from_text(rdtype)
            for rr in rrset
        ]
        assert len(ips) == 4, (name, ips)
        proxy_net = ipaddress.ip_network(
            "100.96.0.0/11" if fam == 4 else "fd00:2021:1111:8000::/107"
        )
        assert all(ipaddress.ip_address(a) in proxy_net for a in ips), ips
        known = self.answers.setdefault(name, {})
        if fam in known:
            assert sorted(known[fam]) == sorted(ips), f"proxy IPs of {name} changed"
        else:
            for a in ips:
                assert self.proxy_owner.setdefault(a, name) == name, f"{a} given to two names"
            known[fam] = ips

    def _send(self, dst: str, name: str | None, proto: str, port: int, sport: int) -> None:
        src = CLIENT_V4 if family(dst) == 4 else CLIENT_V6
        token = self.new_token()
        if proto == "tcp":
            packet = ipp.build_tcp(src, dst, sport, port, token)
        elif proto == "udp":
            packet = ipp.build_udp(src, dst, sport, port, token)
        else:
            packet = ipp.build_echo(src, dst, sport, self.counter & 0xFFFF, token)
            port = sport
        rid = self.client_route(dst, name)
        s = Sent(token, self.w.now, packet, dst, proto, sport, port, name, rid)
        if rid is None:
            s.state = "dropped"
        self.sent[token] = s
        self.w.send(packet)

    @rule(
        data=st.data(),
        proto=st.sampled_from(["tcp", "udp", "icmp"]),
        port=st.sampled_from(PORTS),
        sport=st.sampled_from(SPORTS),
    )
    def send_to_address(self, data: st.DataObject, proto: str, port: int, sport: int) -> None:
        routed = [a for a in CIDR_TARGETS if self.client_route(a, None) is not None]
        dst = self.pick(data, routed, [a for a in CIDR_TARGETS if a not in routed], "target")
        self._send(dst, None, proto, port, sport if proto != "icmp" else sport - 40000 + 7)

    @precondition(lambda self: bool(self.answers))
    @rule(
        data=st.data(),
        proto=st.sampled_from(["tcp", "udp", "icmp"]),
        port=st.sampled_from(PORTS),
        sport=st.sampled_from(SPORTS),
    )
    def send_to_name(self, data: st.DataObject, proto: str, port: int, sport: int) -> None:
        """To one of the first two proxy IPs of a family the stub returned for a name."""
        targets = [
            (ips[i], name)
            for name, fams in sorted(self.answers.items())
            for _, ips in sorted(fams.items())
            for i in (0, 1)
        ]
        routed = [x for x in targets if self.name_resource(x[1]) is not None]
        dst, name = self.pick(data, routed, [x for x in targets if x not in routed], "target")
        self._send(dst, name, proto, port, sport if proto != "icmp" else sport - 40000 + 7)

    @rule(
        data=st.data(),
        proto=st.sampled_from(["tcp", "udp", "icmp"]),
        port=st.sampled_from(PORTS),
        sport=st.sampled_from(SPORTS),
    )
    def resolve_and_send(self, data: st.DataObject, proto: str, port: int, sport: int) -> None:
        """What an application does: look the name up, then talk to the first address."""
        names = sorted(NAMES)
        covered = [n for n in names if self.name_resource(n) is not None]
        name = self.pick(data, covered, [n for n in names if n not in covered], "name")
        self._dns_query(name, "A")
        if name in self.answers and 4 in self.answers[name]:
            dst = self.answers[name][4][0]
            self._send(dst, name, proto, port, sport if proto != "icmp" else sport - 40000 + 7)

    @precondition(lambda self: bool(self.sent))
    @rule(data=st.data())
    def send_again(self, data: st.DataObject) -> None:
        """Another packet of a flow the application used before."""
        t = self.w.now
        keys = sorted({(s.key, s.name) for s in self.sent.values()})
        # Mostly flows the gateway holds (so filter and access changes meet established flows).
        live = [
            k for k in keys if k[0] in self.flows and self.flows[k[0]].status(k[0][0], t) == "alive"
        ]
        routed = [k for k in keys if self.client_route(k[0][1], k[1]) is not None]
        (proto, dst, sport, dport), name = self.pick(
            data, live or routed, [k for k in keys if k not in (live or routed)], "flow"
        )
        self._send(dst, name, proto, dport, sport)

    @precondition(lambda self: bool(self.flows))
    @rule(data=st.data())
    def resource_replies(self, data: st.DataObject) -> None:
        """The resource answers to the outside address of a flow (live or one the gateway dropped)."""
        t = self.w.now
        keys = sorted(self.flows)
        alive = [k for k in keys if self.flows[k].status(k[0], t) == "alive"]
        key = self.pick(data, alive, [k for k in keys if k not in alive], "flow")
        proto, dst, _sport, dport = key
        f = self.flows[key]
        # Whoever owns that outside tuple now (a later flow may have taken it over) gets the reply.
        owners = [
            (k, fl)
            for k, fl in self.flows.items()
            if k[0] == proto
            and family(k[1]) == family(dst)
            and fl.real == f.real
            and fl.out_port == f.out_port
            and (proto == "icmp" or k[3] == dport)
            and fl.status(proto, t) != "dead"
        ]
        if any(fl.status(proto, t) == "uncertain" for _, fl in owners):
            return
        assert len(owners) <= 1, f"two live flows share the outside tuple: {owners}"
        client_ip = CLIENT_V4 if family(dst) == 4 else CLIENT_V6
        token = self.new_token()
        if proto == "tcp":
            packet = ipp.build_tcp(f.real, client_ip, dport, f.out_port, token)
        elif proto == "udp":
            packet = ipp.build_udp(f.real, client_ip, dport, f.out_port, token)
        else:
            packet = ipp.build_echo(f.real, client_ip, f.out_port, 1, token, reply=True)
        if owners:
            okey, owner = owners[0]
            owner.answered = True
            owner.last_seen = t
            # While the client reconnects (a new connection replaced a stale one), a reply the
            # gateway sends over its old session may be lost; else it must arrive.
            self.replies[token] = Reply(token, okey, "yes" if self.tunnel_up() else "maybe")
        else:
            self.replies[token] = Reply(token, key, "no")
        self.w.resource_reply("gw1", packet)

    # --- checking observations ----------------------------------------------------------------------
    def observe(self) -> None:
        """Replay everything the world recorded since the last step, in time order, against the model."""
        w, g = self.w, self.g
        items: list[tuple[float, int, Any]] = []
        for gr in w.grants[self.seen_grants :]:
            items.append((gr.at, 1, ("grant", gr)))
        self.seen_grants = len(w.grants)
        for i, gr in enumerate(w.grants):
            if i in self.expired:
                continue
            later = [x for x in w.grants[i + 1 :] if x.resource_id == gr.resource_id]
            t_exp = gr.expires_at - UNIX0
            if later and later[0].at < t_exp:
                self.expired.add(i)  # superseded before it expired
                continue
            if t_exp <= w.now:
                self.expired.add(i)
                items.append((t_exp, 0, ("expiry", gr)))
        for t, msg in g.assigned[self.seen_assigned :]:
            items.append((t, 2, ("assigned", msg)))
        self.seen_assigned = len(g.assigned)
        for t, pkt in g.to_resources[self.seen_arrivals :]:
            items.append((t, 3, ("arrival", pkt)))
        self.seen_arrivals = len(g.to_resources)
        for t, pkt in w.to_app[self.seen_app :]:
            items.append((t, 4, ("app", pkt)))
        self.seen_app = len(w.to_app)
        items.sort(key=lambda x: (x[0], x[1]))
        for t, _, (kind, obj) in items:
            getattr(self, f"_on_{kind}")(t, obj)
        # routes that changed under a waiting packet: the client drops it when it flushes
        for s in self.sent.values():
            if s.state == "pending" and self.client_route(s.dst, s.name) != s.rid:
                s.state = "stale"
        assert len(g.dns_queries) == self.expected_queries, (
            f"gateway resolver asked {len(g.dns_queries)} times, model expects "
            f"{self.expected_queries}: {g.dns_queries}"
        )

    def _on_expiry(self, t: float, gr: Grant) -> None:
        self.forget_resource(gr.resource_id, t)

    def _on_grant(self, t: float, gr: Grant) -> None:
        assert self.visible(gr.resource_id) and self.policies[gr.resource_id] == "allow"
        self.revalidate(t)

    def _on_assigned(self, t: float, msg: dict[str, Any]) -> None:
        rid, name = msg["resource"], msg["domain"]
        if self.grant_active(rid, t) is None:
            return  # the gateway ignores names of resources it has not authorized
        assert rid in NAMES[name], (rid, name)
        cached = self.cache.get(name)
        if cached is not None and cached[1] > t:
            addrs = cached[0]
        else:
            self.expected_queries += 1
            addrs = list(self.records.get(name, []))
            if addrs:
                self.cache[name] = (addrs, t + DNS_CACHE_TTL)
        by_fam = {4: [a for a in addrs if family(a) == 4], 6: [a for a in addrs if family(a) == 6]}
        seen = {4: 0, 6: 0}
        for proxy in msg["proxy_ips"]:
            fam = family(proxy)
            real = by_fam[fam][seen[fam] % len(by_fam[fam])] if by_fam[fam] else None
            seen[fam] += 1
            self.gw_proxy[proxy] = (rid, name, real)

    def _find_sent(self, token: bytes, what: str) -> Sent:
        s = self.sent.get(token)
        assert s is not None, f"{what} carries no packet the application sent"
        assert s.state in ("pending", "stale"), (
            f"{what}: packet {token!r} to {s.dst} already {s.state} (arrived twice / answered twice)"
        )
        return s

    def _on_arrival(self, t: float, raw: bytes) -> None:
        p = ipp.parse(raw)
        assert p is not None and p.checksums_ok(), "mangled packet on the resource network"
        s = self._find_sent(p.payload, "packet on the resource network")
        assert s.state == "pending" or self.client_route(s.dst, s.name) == s.rid
        assert s.rid is not None and self.policies.get(s.rid) == "allow", (s.rid, self.policies)
        assert p.src_ip == s.src, (p.src_ip, s.src)
        key = s.key
        f = self.flows.get(key)
        status = f.status(s.proto, t) if f is not None else "dead"
        if p.is_icmp:
            assert p.is_icmp_echo and p.icmp_type in (8, 128)
            out_port, dport = p.icmp_id, s.dport  # the identifier is both "ports"; NAT may remap it
        else:
            assert p.proto == PROTO_NUM[s.proto]
            out_port, dport = p.sport, p.dport
        assert dport == s.dport, (dport, s.dport)
        on_flow = f is not None and (p.dst_ip, out_port) == (f.real, f.out_port)
        if f is not None and on_flow and status in ("alive", "uncertain"):
            f.last_seen = t
            s.state = "done"
            event("packet arrived on a flow")
            return
        assert status != "alive", (
            f"packet of a live flow left as {p.dst_ip}:{out_port}, flow is {f.real}:{f.out_port}"
        )
        verdict, rid, real = self.gw_route(s.proto, s.dst, s.dport, t)
        assert verdict == "ok", (
            f"gateway forwarded a packet to {s.dst} it should refuse ({verdict})"
        )
        assert p.dst_ip == real, f"arrived at {p.dst_ip}, expected {real} ({s.name})"
        nat = s.name is not None
        taken = {
            fl.out_port
            for k, fl in self.flows.items()
            if k != key
            and k[0] == s.proto
            and fl.real == real
            and (s.proto == "icmp" or k[3] == s.dport)
            and fl.status(k[0], t) != "dead"
        }
        live_taken = {
            fl.out_port
            for k, fl in self.flows.items()
            if k != key
            and k[0] == s.proto
            and fl.real == real
            and (s.proto == "icmp" or k[3] == s.dport)
            and fl.status(k[0], t) == "alive"
        }
        if not nat:
            assert out_port == s.sport
        else:
            assert out_port not in live_taken, f"NAT reused port {out_port} of a live flow"
            if s.sport not in taken:
                assert out_port == s.sport, "source port remapped without a collision"
        assert rid is not None and real is not None
        self.flows[key] = Flow(rid, real, out_port, nat, t)
        s.state = "done"
        event(
            f"packet arrived, new {'NAT' if nat else 'direct'} flow"
            + (" (port remapped)" if out_port != s.sport else "")
        )

    def _on_app(self, t: float, raw: bytes) -> None:
        p = ipp.parse(raw)
        assert p is not None and p.checksums_ok(), "mangled packet to the application"
        if p.is_icmp_error:
            q = p.icmp_quoted()
            assert q is not None
            quoted = bytes(p.buf[p.l4 + 8 : p.end])
            s = self._find_sent(q.payload, "ICMP error")
            assert quoted == s.packet, "ICMP error does not quote the packet as sent"
            assert p.src_ip == s.dst and p.dst_ip == s.src
            code = (p.icmp_type, p.icmp_code)
            v = family(s.dst)
            allowed: list[tuple[int, int]] = []
            if s.rid is not None and self.policies.get(s.rid) == "forbidden":
                allowed.append(icmp_codes("prohibited", v))
            if s.rid is not None and self.last_decision(s.rid, t) == "offline":
                allowed.append(icmp_codes("unreachable", v))  # the client's answer to "offline"
            f = self.flows.get(s.key)
            if f is None or f.status(s.proto, t) != "alive":
                verdict, _, _ = self.gw_route(s.proto, s.dst, s.dport, t)
                flushed = s.state == "pending" or self.client_route(s.dst, s.name) == s.rid
                if verdict != "ok" and flushed:
                    allowed.append(icmp_codes(verdict, v))
            assert code in allowed, (
                f"ICMP {code} for {s.proto} to {s.dst}:{s.dport} ({s.name}, {s.rid}, "
                f"policy {self.policies.get(s.rid or '')}); model allows {allowed}"
            )
            s.state = "done"
            event(f"ICMP {code}")
            return
        r = self.replies.get(p.payload)
        assert r is not None, f"unexpected packet to the application: {p!r}"
        assert r.state == "pending", "reply delivered twice"
        assert r.expect != "no", "a reply on a flow the gateway dropped reached the application"
        proto, dst, sport, dport = r.sent_key
        assert p.src_ip == dst, f"reply from {p.src_ip}, application talked to {dst}"
        if proto == "icmp":
            assert p.is_icmp_echo and p.icmp_id == sport
        else:
            assert (p.sport, p.dport) == (dport, sport)
        r.state = "done"
        event("reply reached the application")

    # --- invariants ---------------------------------------------------------------------------------
    @invariant()
    def observations_match_the_model(self) -> None:
        self.observe()
        for r in self.replies.values():
            if r.expect == "yes":
                assert r.state == "done", "a reply on a live flow did not reach the application"

    def teardown(self) -> None:
        event(f"sent: {len(self.sent) // 5 * 5}+")

    @invariant()
    def gateway_never_silent(self) -> None:
        silent = [e for e in self.w.events if isinstance(e, GatewaySilent)]
        assert not silent, silent


ClientGatewayModel.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestClientGatewayModel = ClientGatewayModel.TestCase
