"""ICE candidates: RFC 8445 priorities and foundations, and the SDP ``candidate:`` line."""

from __future__ import annotations

import ipaddress
import zlib
from dataclasses import dataclass, field

Addr = tuple[str, int]

KINDS = ("host", "srflx", "prflx", "relay")

# RFC 8445 §5.1.2.2: recommended type preferences.
TYPE_PREFERENCE = {"host": 126, "prflx": 110, "srflx": 100, "relay": 0}
# RFC 8445 §5.1.2.1: 65535 when there is a single interface per family; IPv6 above IPv4 (RFC 8421).
LOCAL_PREFERENCE_V6 = 65535
LOCAL_PREFERENCE_V4 = 65534

COMPONENT_RTP = 1


def candidate_priority(
    kind: str, local_preference: int = LOCAL_PREFERENCE_V4, component: int = 1
) -> int:
    """RFC 8445 §5.1.2.1: priority = 2^24 * type pref + 2^8 * local pref + (256 - component)."""
    if kind not in TYPE_PREFERENCE:
        raise ValueError(f"unknown candidate type {kind!r}")
    if not 0 <= local_preference <= 65535:
        raise ValueError("local preference must be in 0..65535")
    if not 1 <= component <= 256:
        raise ValueError("component must be in 1..256")
    return (TYPE_PREFERENCE[kind] << 24) + (local_preference << 8) + (256 - component)


def local_preference_for(ip: str) -> int:
    """Local preference by address family (RFC 8421: prefer IPv6)."""
    return LOCAL_PREFERENCE_V6 if ":" in ip else LOCAL_PREFERENCE_V4


def candidate_foundation(
    kind: str, base_ip: str, server_ip: str | None = None, transport: str = "udp"
) -> str:
    """RFC 8445 §5.1.1.3: equal for same type, base IP, STUN/TURN server IP and transport."""
    key = f"{kind}|{base_ip}|{server_ip or ''}|{transport}".encode()
    return str(zlib.crc32(key))


def pair_priority(controlling_prio: int, controlled_prio: int) -> int:
    """RFC 8445 §6.1.2.3: 2^32*MIN(G,D) + 2*MAX(G,D) + (G>D?1:0)."""
    g, d = controlling_prio, controlled_prio
    return (min(g, d) << 32) + 2 * max(g, d) + (1 if g > d else 0)


def _check_addr(addr: Addr, what: str) -> None:
    ip, port = addr
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        raise ValueError(f"bad {what} address {ip!r}") from None
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"bad {what} port {port!r}")


@dataclass(frozen=True, slots=True)
class Candidate:
    """One transport address a peer may be reached at.

    ``base`` is the address packets are sent from: the host address for host and
    server-reflexive candidates, the relayed address itself for relay candidates.
    ``related`` is the SDP ``raddr``/``rport`` (base of a srflx, mapped address of a relay).
    """

    kind: str
    addr: Addr
    base: Addr
    priority: int
    foundation: str
    component: int = COMPONENT_RTP
    related: Addr | None = field(default=None)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown candidate type {self.kind!r}")
        _check_addr(self.addr, "candidate")
        _check_addr(self.base, "base")
        if self.related is not None:
            _check_addr(self.related, "related")
        if not 0 < self.priority < 2**32:
            raise ValueError("priority must be in 1..2^32-1")
        if not 1 <= self.component <= 256:
            raise ValueError("component must be in 1..256")
        if not self.foundation or len(self.foundation) > 32 or not self.foundation.isalnum():
            raise ValueError("foundation must be 1-32 alphanumeric characters")

    @classmethod
    def host(cls, addr: Addr, component: int = COMPONENT_RTP) -> Candidate:
        """A host candidate on a local socket address."""
        return cls(
            "host",
            addr,
            addr,
            candidate_priority("host", local_preference_for(addr[0]), component),
            candidate_foundation("host", addr[0]),
            component,
        )

    @classmethod
    def server_reflexive(
        cls, addr: Addr, base: Addr, server: Addr, component: int = COMPONENT_RTP
    ) -> Candidate:
        """A srflx candidate learned from a STUN Binding to ``server``."""
        return cls(
            "srflx",
            addr,
            base,
            candidate_priority("srflx", local_preference_for(addr[0]), component),
            candidate_foundation("srflx", base[0], server[0]),
            component,
            related=base,
        )

    @classmethod
    def relayed(
        cls, addr: Addr, server: Addr, mapped: Addr | None = None, component: int = COMPONENT_RTP
    ) -> Candidate:
        """A relay candidate: the relayed address of a TURN allocation on ``server``."""
        return cls(
            "relay",
            addr,
            addr,
            candidate_priority("relay", local_preference_for(addr[0]), component),
            candidate_foundation("relay", addr[0], server[0]),
            component,
            related=mapped,
        )

    @classmethod
    def peer_reflexive(
        cls, addr: Addr, base: Addr, priority: int, component: int = COMPONENT_RTP
    ) -> Candidate:
        """A prflx candidate learned from a connectivity check (RFC 8445 §7.2.5.3.1, §7.3.1.3)."""
        return cls("prflx", addr, base, priority, candidate_foundation("prflx", addr[0]), component)

    def to_sdp(self) -> str:
        """Render as ``candidate:<foundation> <component> udp <prio> <ip> <port> typ <kind> [raddr .. rport ..]``."""
        s = (
            f"candidate:{self.foundation} {self.component} udp {self.priority} "
            f"{self.addr[0]} {self.addr[1]} typ {self.kind}"
        )
        if self.related is not None:
            s += f" raddr {self.related[0]} rport {self.related[1]}"
        return s

    @classmethod
    def from_sdp(cls, s: str) -> Candidate:
        """Parse an SDP candidate attribute (with or without ``a=``); ``ValueError`` on bad input."""
        if not isinstance(s, str):  # decoded portal JSON may hold anything
            raise ValueError("candidate must be a string")  # noqa: TRY004
        text = s.strip().removeprefix("a=")
        if not text.startswith("candidate:"):
            raise ValueError("candidate must start with 'candidate:'")
        parts = text[len("candidate:") :].split()
        if len(parts) < 8:
            raise ValueError("candidate has too few fields")
        foundation, component_s, transport, prio_s, ip, port_s, typ, kind = parts[:8]
        if transport.lower() != "udp":
            raise ValueError(f"unsupported transport {transport!r}")
        if typ != "typ":
            raise ValueError("expected 'typ'")
        if not (component_s.isdigit() and prio_s.isdigit() and port_s.isdigit()):
            raise ValueError("component, priority and port must be decimal")
        try:
            ip = str(ipaddress.ip_address(ip))
        except ValueError:
            raise ValueError(f"bad candidate address {ip!r}") from None
        addr = (ip, int(port_s))
        related: Addr | None = None
        rest = parts[8:]
        raddr = rport = None
        for i in range(0, len(rest) - 1, 2):
            key, value = rest[i], rest[i + 1]
            if key == "raddr":
                raddr = value
            elif key == "rport":
                rport = value
        if raddr is not None and rport is not None:
            if not rport.isdigit():
                raise ValueError("rport must be decimal")
            try:
                raddr = str(ipaddress.ip_address(raddr))
            except ValueError:
                raise ValueError(f"bad related address {raddr!r}") from None
            related = (raddr, int(rport))
        if kind not in KINDS:
            raise ValueError(f"unknown candidate type {kind!r}")
        return cls(kind, addr, addr, int(prio_s), foundation, int(component_s), related)

    def same_transport(self, other: Candidate) -> bool:
        """True when both are of the same component and address family."""
        return self.component == other.component and (":" in self.addr[0]) == (":" in other.addr[0])
