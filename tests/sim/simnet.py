"""A simulated IP network with RFC 4787 NAT behaviours, driven by a virtual clock.

Theory of operation
-------------------
Hosts own IP addresses; a host is either on the public "internet" or on the LAN behind one
:class:`Nat`. :meth:`SimNet.send` is called with ``(src, dst, payload)`` as a socket would be:

1. the sender's link may be down or lose the packet (seeded rng, so runs replay exactly);
2. a packet leaving a LAN for anything not on that LAN is translated by the LAN's NAT
   (mapping behaviour: endpoint-independent, address-dependent, address-and-port-dependent);
3. it is queued for delivery after the sum of both ends' one-way latency;
4. on arrival, a packet for a NAT's public address passes the NAT's filter (endpoint-
   independent, address-dependent, address-and-port-dependent) and is translated back;
   a private address is unreachable from outside its LAN.

:meth:`SimNet.run` is the whole-system loop: drain every node's ``poll_transmit``, deliver due
packets, and advance the :class:`VirtualClock` to the earliest of the next delivery and every
node's ``poll_timeout``. Every decision is appended to :attr:`SimNet.trace`; the same seed gives
the same trace.
"""

from __future__ import annotations

import heapq
import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from firezone.proto.rng import SeededRng

from .clock import VirtualClock

Addr = tuple[str, int]

# RFC 4787 §4: mapping / filtering behaviours.
ENDPOINT_INDEPENDENT = "endpoint-independent"
ADDRESS_DEPENDENT = "address-dependent"
ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"
BEHAVIOURS = (ENDPOINT_INDEPENDENT, ADDRESS_DEPENDENT, ADDRESS_AND_PORT_DEPENDENT)

# RFC 4787 REQ-5: a UDP mapping must not expire in less than 2 minutes.
DEFAULT_MAPPING_TIMEOUT = 120.0


class SimNode(Protocol):
    """What the network drives: a sans-IO machine plus its addresses."""

    def handle_datagram(self, src: Addr, dst: Addr, payload: bytes, now: float) -> None: ...
    def handle_timeout(self, now: float) -> None: ...
    def poll_transmit(self) -> Any: ...  # object with .src .dst .payload, or a 3-tuple, or None
    def poll_timeout(self) -> float | None: ...


@dataclass(slots=True)
class _Mapping:
    internal: Addr
    external_port: int
    last_out: float
    allowed: dict[Addr, float] = field(default_factory=dict)  # remote endpoint -> last outbound


class Nat:
    """One NAT box (RFC 4787) with a public IPv4/IPv6 address."""

    def __init__(
        self,
        name: str,
        public_ip: str,
        *,
        mapping: str = ENDPOINT_INDEPENDENT,
        filtering: str = ENDPOINT_INDEPENDENT,
        rng: SeededRng,
        timeout: float = DEFAULT_MAPPING_TIMEOUT,
    ) -> None:
        if mapping not in BEHAVIOURS or filtering not in BEHAVIOURS:
            raise ValueError("unknown NAT behaviour")
        self.name = name
        self.public_ip = public_ip
        self.mapping = mapping
        self.filtering = filtering
        self.timeout = timeout
        self._rng = rng
        self._by_key: dict[tuple[Any, ...], _Mapping] = {}
        self._by_port: dict[int, _Mapping] = {}

    @classmethod
    def easy(cls, name: str, public_ip: str, rng: SeededRng) -> Nat:
        """Endpoint-independent mapping, address-dependent filtering (a typical home router)."""
        return cls(
            name, public_ip, mapping=ENDPOINT_INDEPENDENT, filtering=ADDRESS_DEPENDENT, rng=rng
        )

    @classmethod
    def symmetric(cls, name: str, public_ip: str, rng: SeededRng) -> Nat:
        """Address-and-port-dependent mapping and filtering (hole punching fails)."""
        return cls(
            name,
            public_ip,
            mapping=ADDRESS_AND_PORT_DEPENDENT,
            filtering=ADDRESS_AND_PORT_DEPENDENT,
            rng=rng,
        )

    def _key(self, internal: Addr, dst: Addr) -> tuple[Any, ...]:
        if self.mapping == ENDPOINT_INDEPENDENT:
            return (internal,)
        if self.mapping == ADDRESS_DEPENDENT:
            return (internal, dst[0])
        return (internal, dst)

    def _expired(self, m: _Mapping, now: float) -> bool:
        return now - m.last_out > self.timeout

    def outbound(self, internal: Addr, dst: Addr, now: float) -> Addr:
        """Translate an outgoing packet's source; create or refresh the mapping."""
        key = self._key(internal, dst)
        m = self._by_key.get(key)
        if m is not None and self._expired(m, now):
            del self._by_key[key]
            self._by_port.pop(m.external_port, None)
            m = None
        if m is None:
            while True:
                port = 1024 + self._rng.randbelow(65536 - 1024)
                old = self._by_port.get(port)
                if old is None or self._expired(old, now):
                    break
            m = _Mapping(internal, port, now)
            self._by_key[key] = m
            self._by_port[port] = m
        m.last_out = now
        m.allowed[dst] = now
        return (self.public_ip, m.external_port)

    def inbound(self, src: Addr, external_port: int, now: float) -> Addr | None:
        """Filter and translate an incoming packet; None when the NAT drops it."""
        m = self._by_port.get(external_port)
        if m is None or self._expired(m, now):
            return None
        live = [a for a, t in m.allowed.items() if now - t <= self.timeout]
        if self.filtering == ADDRESS_DEPENDENT and all(a[0] != src[0] for a in live):
            return None
        if self.filtering == ADDRESS_AND_PORT_DEPENDENT and src not in live:
            return None
        return m.internal

    @property
    def mapping_count(self) -> int:
        return len(self._by_port)


@dataclass(slots=True)
class Host:
    name: str
    ip: str
    nat: Nat | None
    latency: float
    loss: float = 0.0
    up: bool = True
    node: SimNode | None = None


@dataclass(frozen=True, slots=True)
class Datagram:
    src: Addr
    dst: Addr
    payload: bytes


def _norm_ip(ip: str) -> str:
    return str(ipaddress.ip_address(ip))


class SimNet:
    """The network: hosts, NATs, latency, seeded loss, partitions and roaming."""

    def __init__(self, seed: int = 0, *, clock: VirtualClock | None = None) -> None:
        self.rng = SeededRng(f"simnet:{seed}")
        self.clock = clock if clock is not None else VirtualClock()
        self.hosts: dict[str, Host] = {}
        self.nats: dict[str, Nat] = {}
        self._by_ip: dict[str, Host] = {}
        self._nat_by_ip: dict[str, Nat] = {}
        self._queue: list[tuple[float, int, Addr, Addr, bytes, Nat | None]] = []
        self._seq = 0
        self._blocked: set[frozenset[str]] = set()
        self.trace: list[tuple[float, str, Addr, Addr, int]] = []
        self.delivered = 0
        self.dropped: dict[str, int] = {}

    # --- topology -------------------------------------------------------------------------
    def add_nat(
        self,
        name: str,
        public_ip: str,
        *,
        mapping: str = ENDPOINT_INDEPENDENT,
        filtering: str = ADDRESS_DEPENDENT,
        timeout: float = DEFAULT_MAPPING_TIMEOUT,
    ) -> Nat:
        """Create a NAT box with its own (seeded) port allocator."""
        public_ip = _norm_ip(public_ip)
        nat = Nat(
            name,
            public_ip,
            mapping=mapping,
            filtering=filtering,
            rng=SeededRng(f"nat:{name}:{self.rng.token_bytes(8).hex()}"),
            timeout=timeout,
        )
        self.nats[name] = nat
        self._nat_by_ip[public_ip] = nat
        return nat

    def add_host(
        self,
        name: str,
        ip: str,
        *,
        nat: Nat | str | None = None,
        latency: float = 0.010,
        loss: float = 0.0,
    ) -> Host:
        """Add a host on the internet (``nat=None``) or on the LAN behind ``nat``."""
        ip = _norm_ip(ip)
        if ip in self._by_ip or ip in self._nat_by_ip:
            raise ValueError(f"address {ip} already in use")
        if isinstance(nat, str):
            nat = self.nats[nat]
        host = Host(name, ip, nat, latency, loss)
        self.hosts[name] = host
        self._by_ip[ip] = host
        return host

    def attach(self, name: str, node: SimNode) -> None:
        """Give a host the machine that receives its packets."""
        self.hosts[name].node = node

    def roam(self, name: str, new_ip: str, *, nat: Nat | str | None | bool = False) -> None:
        """Move a host to a new address (and, optionally, behind another NAT)."""
        host = self.hosts[name]
        new_ip = _norm_ip(new_ip)
        if new_ip in self._by_ip:
            raise ValueError(f"address {new_ip} already in use")
        del self._by_ip[host.ip]
        host.ip = new_ip
        if nat is not False:
            host.nat = self.nats[nat] if isinstance(nat, str) else nat  # type: ignore[assignment]
        self._by_ip[new_ip] = host

    def partition(self, a: str, b: str) -> None:
        """Drop every packet between the public sides of hosts (or NATs) ``a`` and ``b``."""
        self._blocked.add(frozenset((self._public_ip_of(a), self._public_ip_of(b))))

    def heal(self) -> None:
        """Remove every partition."""
        self._blocked.clear()

    def set_up(self, name: str, up: bool) -> None:
        """Bring a host's link up or down."""
        self.hosts[name].up = up

    def _public_ip_of(self, name: str) -> str:
        if name in self.nats:
            return self.nats[name].public_ip
        host = self.hosts[name]
        return host.nat.public_ip if host.nat is not None else host.ip

    # --- data path --------------------------------------------------------------------------
    def _drop(self, reason: str, src: Addr, dst: Addr, n: int) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        self.trace.append((self.clock.now, f"drop:{reason}", src, dst, n))

    def send(self, src: Addr, dst: Addr, payload: bytes) -> None:
        """Inject a datagram as if ``src``'s socket sent it now."""
        now = self.clock.now
        n = len(payload)
        sender = self._by_ip.get(src[0])
        if sender is None:
            self._drop("no-such-source", src, dst, n)
            return
        if not sender.up:
            self._drop("link-down", src, dst, n)
            return
        if sender.loss and self.rng.random() < sender.loss:
            self._drop("loss", src, dst, n)
            return
        receiver = self._by_ip.get(dst[0])
        lan: Nat | None = None
        wire_src = src
        if sender.nat is not None and receiver is not None and receiver.nat is sender.nat:
            lan = sender.nat
        elif sender.nat is not None:
            wire_src = sender.nat.outbound(src, dst, now)
        latency = sender.latency + (receiver.latency if receiver is not None else 0.0)
        if receiver is None and dst[0] in self._nat_by_ip:
            latency += self._lan_latency(self._nat_by_ip[dst[0]], dst[1])
        self.trace.append((now, "send", wire_src, dst, n))
        self._seq += 1
        heapq.heappush(self._queue, (now + latency, self._seq, wire_src, dst, payload, lan))

    def _lan_latency(self, nat: Nat, port: int) -> float:
        m = nat._by_port.get(port)
        if m is None:
            return 0.0
        host = self._by_ip.get(m.internal[0])
        return host.latency if host is not None else 0.0

    def next_delivery(self) -> float | None:
        return self._queue[0][0] if self._queue else None

    def _deliver_due(self) -> bool:
        now = self.clock.now
        delivered_any = False
        while self._queue and self._queue[0][0] <= now:
            _, _, src, dst, payload, lan = heapq.heappop(self._queue)
            delivered_any = True
            n = len(payload)
            target: Host | None
            final_dst = dst
            if lan is not None:
                target = self._by_ip.get(dst[0])
            elif frozenset((src[0], dst[0])) in self._blocked:
                self._drop("partition", src, dst, n)
                continue
            elif dst[0] in self._nat_by_ip:
                nat = self._nat_by_ip[dst[0]]
                internal = nat.inbound(src, dst[1], now)
                if internal is None:
                    self._drop("nat-filter", src, dst, n)
                    continue
                final_dst = internal
                target = self._by_ip.get(internal[0])
            else:
                target = self._by_ip.get(dst[0])
                if target is not None and target.nat is not None:
                    target = None  # private addresses are not routable from outside their LAN
            if target is None or target.node is None:
                self._drop("unreachable", src, dst, n)
                continue
            if not target.up:
                self._drop("link-down", src, final_dst, n)
                continue
            if target.loss and self.rng.random() < target.loss:
                self._drop("loss", src, final_dst, n)
                continue
            self.trace.append((now, "deliver", src, final_dst, n))
            self.delivered += 1
            target.node.handle_datagram(src, final_dst, payload, now)
        return delivered_any

    # --- the loop ---------------------------------------------------------------------------
    def _nodes(self) -> list[SimNode]:
        return [h.node for h in self.hosts.values() if h.node is not None]

    def _drain(self, nodes: Iterable[SimNode]) -> None:
        for node in nodes:
            while (t := node.poll_transmit()) is not None:
                if isinstance(t, tuple):
                    src, dst, payload = t
                else:
                    src, dst, payload = t.src, t.dst, t.payload
                self.send(src, dst, bytes(payload))

    def step(self, until: float) -> bool:
        """Run one round: drain, deliver, then advance to the next deadline (<= ``until``).

        Returns False when nothing is scheduled before ``until``.
        """
        nodes = self._nodes()
        self._drain(nodes)
        if self._deliver_due():
            self._drain(nodes)
            return True
        now = self.clock.now
        due = [n for n in nodes if (t := n.poll_timeout()) is not None and t <= now]
        if due:
            for n in due:
                n.handle_timeout(now)
            self._drain(nodes)
            return True
        deadlines = [n.poll_timeout() for n in nodes] + [self.next_delivery()]
        nxt = min((d for d in deadlines if d is not None), default=None)
        if nxt is None or nxt > until:
            self.clock.advance_to(until)
            return False
        self.clock.advance_to(nxt)
        return True

    def run(
        self,
        *,
        until: Callable[[], bool] | None = None,
        duration: float = 60.0,
        max_steps: int = 1_000_000,
    ) -> bool:
        """Run for at most ``duration`` virtual seconds, stopping early when ``until()`` holds."""
        end = self.clock.now + duration
        for _ in range(max_steps):
            if until is not None and until():
                return True
            if not self.step(end) and self.clock.now >= end:
                return until() if until is not None else True
        raise RuntimeError("simulation did not settle (a machine keeps asking for time 'now')")
