"""The client's split-DNS stub resolver: decides, per query, answer locally or forward.

Theory of operation
-------------------
The OS resolver is pointed at *sentinel* addresses (one IPv4 and one IPv6 sentinel per effective
upstream resolver, firezone-notes §3.1). Every query that reaches a sentinel is fed to
:meth:`DnsStub.handle_query`, which returns one of three results and never raises:

- :class:`Answer` -- a complete DNS response built here: A/AAAA for a resource name (4 + 4 proxy
  IPs per name, TTL 1 s), PTR for an assigned proxy IP, NXDOMAIN for the Firefox DoH canary,
  FORMERR/NOTIMP for malformed or unsupported queries;
- :class:`Forward` -- the query bytes, unchanged (EDNS, flags and all), and the upstream the
  sentinel stands for; the driver sends them on the transport the query came on;
- :class:`Drop` -- input that does not deserve an answer (too short, a response, ...).

The forwarding path is the hot one (every non-resource query of the machine), so it scans the
header and question by hand and hands the same ``bytes`` on. Local answers are assembled by hand
too, from answer sections prebuilt per name, for the usual query shape (one question, at most an
OPT record); dnspython builds the response for anything else.

Proxy IPs are handed out sequentially from ``100.96.0.1`` and ``fd00:2021:1111:8000::1``, skipping
the sentinel range, four of each family per name on its first A or AAAA query, and stay with the
name for the life of the stub (the session). Each A/AAAA query for a resource name queues a
:class:`DomainResolved` event (pulled with :meth:`DnsStub.poll_event`) so the client can tell the
gateway which proxy IPs stand for which name.

Resource names are matched with :class:`~firezone.proto.dns.patterns.PatternTable` (most specific
pattern wins); a single-label query name is also tried with the search domain appended.
"""

from __future__ import annotations

import ipaddress
import logging
import struct
from collections import deque
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.reversename

from firezone.proto.dns.patterns import PatternTable, compile_pattern, normalize_name

__all__ = [
    "CANARY_DOMAIN",
    "PROXY_V4",
    "PROXY_V6",
    "SENTINEL_V4",
    "SENTINEL_V6",
    "Answer",
    "DnsEvent",
    "DnsStub",
    "DomainResolved",
    "Drop",
    "Forward",
    "StubResult",
    "error_response",
]

log = logging.getLogger(__name__)

# firezone-notes §3.1: proxy-IP ranges for DNS resources and the sentinel ranges.
PROXY_V4 = ipaddress.IPv4Network("100.96.0.0/11")
PROXY_V6 = ipaddress.IPv6Network("fd00:2021:1111:8000::/107")
SENTINEL_V4 = ipaddress.IPv4Network("100.100.111.0/24")
SENTINEL_V6 = ipaddress.IPv6Network("fd00:2021:1111:8000:100:100:111:0/120")
IPS_PER_FAMILY = 4
ANSWER_TTL = 1  # seconds; short so a changed resource list takes effect at once
# https://support.mozilla.org/kb/canary-domain-use-application-dnsnet: NXDOMAIN disables DoH.
CANARY_DOMAIN = "use-application-dns.net"
# RFC 6891 §6.2.5 / DNS flag day 2020: the EDNS payload size we advertise.
EDNS_PAYLOAD = 1232
# RFC 1035 §4.2.1: plain UDP messages are limited to 512 octets.
UDP_PLAIN_LIMIT = 512
MAX_UPSTREAMS = 254

_T_A = 1
_T_PTR = 12
_T_AAAA = 28
_T_ANY = 255
_C_IN = 1


class DnsEvent:
    """Base class of the events the stub emits."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class DomainResolved(DnsEvent):
    """A resource name was answered with its proxy IPs (first query and every re-query)."""

    resource_id: str
    domain: str
    proxy_ips: list[str]

    def __post_init__(self) -> None:
        if not self.domain or not self.proxy_ips:
            raise ValueError("DomainResolved needs a domain and proxy IPs")


class StubResult:
    """Base class of what :meth:`DnsStub.handle_query` returns."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Answer(StubResult):
    """Send ``data`` back to the querier: a complete DNS response."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Forward(StubResult):
    """Send ``data`` (the query, unchanged) to ``upstream`` and relay its response."""

    upstream: tuple[str, int]
    data: bytes


@dataclass(frozen=True, slots=True)
class Drop(StubResult):
    """Ignore the query; ``reason`` names why (also a counter key)."""

    reason: str


class _Malformed(Exception):
    pass


def _parse_question(data: bytes) -> tuple[str | None, int, int]:
    """Return (lowercase name without trailing dot or None if not plain ASCII, qtype, qclass).

    Raises _Malformed when the question section is not a well-formed single question.
    """
    pos = 12
    end = len(data)
    labels: list[bytes] = []
    plain = True
    while True:
        if pos >= end:
            raise _Malformed("question runs past the end")
        n = data[pos]
        if n == 0:
            pos += 1
            break
        if n > 63:
            raise _Malformed("compressed or extended label in question")
        label = data[pos + 1 : pos + 1 + n]
        if len(label) != n:
            raise _Malformed("label runs past the end")
        if plain and (b"." in label or not label.isascii()):
            plain = False
        labels.append(label)
        pos += 1 + n
    if pos + 4 > end:
        raise _Malformed("question type/class missing")
    qtype = (data[pos] << 8) | data[pos + 1]
    qclass = (data[pos + 2] << 8) | data[pos + 3]
    name = b".".join(labels).decode("ascii").lower() if plain else None
    return name, qtype, qclass


def _question_end(data: bytes) -> int:
    pos = 12
    while True:
        n = data[pos]
        if n == 0:
            return pos + 5
        if n > 63:
            raise _Malformed("compressed or extended label in question")
        pos += 1 + n


def error_response(query: bytes, rcode: int) -> bytes:
    """Build a response with ``rcode`` to the (at least 12-byte) ``query``, no answer records.

    The question is echoed when it can be found, else the response is the header alone.
    """
    flags = (query[2] << 8) | query[3]
    # Keep opcode and RD, set QR and RA (RFC 1035 §4.1.1).
    out = (query[:2] + (0x8080 | (flags & 0x7900) | (rcode & 0xF)).to_bytes(2, "big"))
    if query[4:6] == b"\x00\x01":
        try:
            end = _question_end(query)
        except (_Malformed, IndexError):
            end = 0
        if 0 < end <= len(query):
            return out + b"\x00\x01" + b"\x00" * 6 + query[12:end]
    return out + b"\x00" * 8


def _fast_response(query: bytes, rcode: int, rrs: tuple[bytes, int]) -> bytes | None:
    """Build the response by hand for the common query shape: one question, at most one OPT.

    Returns None for anything else. Our answers stay far below 512 octets (4 AAAA records or one
    PTR plus a question of at most 255 octets), so no truncation is needed.
    """
    qend = _question_end(query)
    if query[6:10] != b"\x00\x00\x00\x00":
        return None
    arcount = (query[10] << 8) | query[11]
    opt = b""
    if arcount == 1:
        # RFC 6891 §6.1.2: OPT = root name, TYPE 41, CLASS = payload, TTL = ext-rcode/version/flags.
        if len(query) < qend + 11 or query[qend] != 0 or query[qend + 1 : qend + 3] != b"\x00\x29":
            return None
        rdlen = (query[qend + 9] << 8) | query[qend + 10]
        if qend + 11 + rdlen != len(query) or query[qend + 6] != 0:
            return None  # trailing data, or EDNS version > 0 (BADVERS is dnspython's business)
        do_bit = query[qend + 7] & 0x80
        opt = struct.pack("!BHHBBBBH", 0, 41, EDNS_PAYLOAD, 0, 0, do_bit, 0, 0)
    elif arcount != 0 or len(query) != qend:
        return None
    flags = (query[2] << 8) | query[3]
    out_flags = 0x8080 | (flags & 0x7900) | rcode  # QR, RA; opcode and RD kept; AA/TC/AD/CD clear
    header = query[:2] + struct.pack("!HHHHH", out_flags, 1, rrs[1], 0, 1 if opt else 0)
    return header + query[12:qend] + rrs[0] + opt


def _rr(rtype: int, rdata: bytes) -> bytes:
    # Owner name = a compression pointer to the question name at offset 12 (RFC 1035 §4.1.4).
    return struct.pack("!HHHIH", 0xC00C, rtype, _C_IN, ANSWER_TTL, len(rdata)) + rdata


def _wire_name(name: str) -> bytes:
    return b"".join(bytes([len(lab)]) + lab for lab in name.encode("ascii").split(b".")) + b"\x00"


class _Domain:
    __slots__ = ("name", "ptr", "resource_id", "rr_a", "rr_aaaa", "v4", "v6")

    def __init__(self, name: str, resource_id: str | None, v4: list[str], v6: list[str]) -> None:
        self.name = name
        self.resource_id = resource_id
        self.v4 = v4
        self.v6 = v6
        # Answer sections, prebuilt: the same bytes serve every query for this name.
        self.rr_a = b"".join(_rr(_T_A, ipaddress.IPv4Address(ip).packed) for ip in v4)
        self.rr_aaaa = b"".join(_rr(_T_AAAA, ipaddress.IPv6Address(ip).packed) for ip in v6)
        self.ptr = _rr(_T_PTR, _wire_name(name))


class DnsStub:
    """Split-DNS decisions and the proxy-IP mapping for DNS resources."""

    def __init__(self, *, search_domain: str | None = None) -> None:
        self._table: PatternTable[str] = PatternTable()
        self._search: str | None = None
        self.set_search_domain(search_domain)
        # sentinel address text -> upstream (None: no upstream known; queries get SERVFAIL)
        self._sentinels: dict[str, tuple[str, int] | None] = {}
        self.set_upstreams([])
        self._domains: dict[str, _Domain] = {}
        self._by_ip: dict[str, _Domain] = {}
        self._next_v4 = int(PROXY_V4.network_address) + 1
        self._next_v6 = int(PROXY_V6.network_address) + 1
        self._events: deque[DnsEvent] = deque()
        self.counters: dict[str, int] = {}

    # --- configuration ------------------------------------------------------------------------------
    def set_resources(self, resources: list[tuple[str, str]]) -> None:
        """Replace the DNS resources: ``(resource_id, pattern)`` pairs; invalid patterns are skipped."""
        table: PatternTable[str] = PatternTable()
        for rid, pattern in resources:
            try:
                table.insert(compile_pattern(pattern), rid)
            except ValueError:
                self._count("bad_pattern")
                log.debug("dns stub: ignoring invalid pattern", extra={"resource_id": rid})
        self._table = table
        # Proxy IPs stay with their name; only which resource the name belongs to is recomputed.
        for d in self._domains.values():
            d.resource_id = table.lookup(d.name)

    def set_upstreams(self, upstreams: list[tuple[str, int]]) -> list[str]:
        """Map sentinels to upstreams; return the IPv4 then the IPv6 sentinel addresses."""
        usable: list[tuple[str, int]] = []
        for host, port in upstreams:
            try:
                ip = ipaddress.ip_address(host)
            except ValueError:
                self._count("bad_upstream")
                continue
            # An upstream inside our own ranges would loop queries back into the stub.
            if ip in SENTINEL_V4 or ip in SENTINEL_V6 or ip in PROXY_V4 or ip in PROXY_V6:
                self._count("upstream_loop")
                continue
            if len(usable) < MAX_UPSTREAMS:
                usable.append((str(ip), int(port)))
        targets: list[tuple[str, int] | None] = list(usable) or [None]
        v4 = [str(SENTINEL_V4.network_address + i + 1) for i in range(len(targets))]
        v6 = [str(SENTINEL_V6.network_address + i + 1) for i in range(len(targets))]
        self._sentinels = {}
        for i, target in enumerate(targets):
            self._sentinels[v4[i]] = target
            self._sentinels[v6[i]] = target
        return v4 + v6

    def set_search_domain(self, domain: str | None) -> None:
        """Set the search domain appended to single-label query names (None: none)."""
        self._search = normalize_name(domain.strip()) or None if domain else None

    # --- queries ----------------------------------------------------------------------------------
    def handle_query(self, data: bytes, *, sentinel: str, tcp: bool, now: float) -> StubResult:
        """Decide what to do with one DNS query that arrived on ``sentinel``."""
        if len(data) < 12:
            return self._drop("short")
        if data[2] & 0x80:
            return self._drop("not_a_query")
        if sentinel not in self._sentinels:
            try:
                sentinel = str(ipaddress.ip_address(sentinel))
            except ValueError:
                return self._drop("unknown_sentinel")
            if sentinel not in self._sentinels:
                return self._drop("unknown_sentinel")
        opcode = (data[2] >> 3) & 0xF
        if opcode != 0:
            self._count("notimp")
            return Answer(error_response(data, dns.rcode.NOTIMP))
        if data[4] != 0 or data[5] != 1:
            self._count("formerr")
            return Answer(error_response(data, dns.rcode.FORMERR))
        try:
            name, qtype, qclass = _parse_question(data)
        except _Malformed:
            self._count("formerr")
            return Answer(error_response(data, dns.rcode.FORMERR))

        if name is not None and qclass == _C_IN:
            local = self._local(data, name, qtype, tcp)
            if local is not None:
                return local
        upstream = self._sentinels[sentinel]
        if upstream is None:
            self._count("no_upstream")
            return self._respond(data, tcp, rcode=dns.rcode.SERVFAIL)
        return Forward(upstream, data)

    def _local(self, data: bytes, name: str, qtype: int, tcp: bool) -> StubResult | None:
        if name == CANARY_DOMAIN:
            return self._respond(data, tcp, rcode=dns.rcode.NXDOMAIN)
        if name.endswith(".arpa"):
            return self._reverse(data, name, qtype, tcp)
        fqdn = name
        rid = self._table.lookup(name)
        if rid is None and self._search is not None and name and "." not in name:
            fqdn = f"{name}.{self._search}"
            rid = self._table.lookup(fqdn)
        if rid is None:
            return None
        if qtype not in (_T_A, _T_AAAA):
            # Only addresses are synthesized; other types of a resource name have no data here.
            return self._respond(data, tcp)
        d = self._assign(fqdn, rid)
        if d is None:
            self._count("proxy_ips_exhausted")
            return self._respond(data, tcp, rcode=dns.rcode.SERVFAIL)
        self._events.append(DomainResolved(rid, fqdn, d.v4 + d.v6))
        if qtype == _T_A:
            return self._respond(data, tcp, rrs=(d.rr_a, 4))
        return self._respond(data, tcp, rrs=(d.rr_aaaa, 4))

    def _reverse(self, data: bytes, name: str, qtype: int, tcp: bool) -> StubResult | None:
        try:
            ip = dns.reversename.to_address(dns.name.from_text(name))
            addr = ipaddress.ip_address(ip)
        except (dns.exception.DNSException, ValueError):
            return None
        if addr not in PROXY_V4 and addr not in PROXY_V6:
            return None
        d = self._by_ip.get(str(addr))
        if d is None:
            return self._respond(data, tcp, rcode=dns.rcode.NXDOMAIN)
        if qtype not in (_T_PTR, _T_ANY):
            return self._respond(data, tcp)
        return self._respond(data, tcp, rrs=(d.ptr, 1))

    def _assign(self, fqdn: str, rid: str) -> _Domain | None:
        d = self._domains.get(fqdn)
        if d is not None:
            d.resource_id = rid
            return d
        v4_end = int(PROXY_V4.broadcast_address)
        v6_end = int(PROXY_V6.broadcast_address)
        v4: list[str] = []
        n4 = self._next_v4
        while len(v4) < IPS_PER_FAMILY:
            if n4 >= v4_end:
                return None
            a4 = ipaddress.IPv4Address(n4)
            n4 += 1
            if a4 in SENTINEL_V4:
                n4 = int(SENTINEL_V4.broadcast_address) + 1
                continue
            v4.append(str(a4))
        if self._next_v6 + IPS_PER_FAMILY > v6_end:
            return None
        v6 = [str(ipaddress.IPv6Address(self._next_v6 + i)) for i in range(IPS_PER_FAMILY)]
        self._next_v4 = n4
        self._next_v6 += IPS_PER_FAMILY
        d = _Domain(fqdn, rid, v4, v6)
        self._domains[fqdn] = d
        for ip in v4 + v6:
            self._by_ip[ip] = d
        if log.isEnabledFor(logging.DEBUG):
            log.debug("dns stub: assigned proxy IPs", extra={"domain": fqdn, "resource_id": rid})
        return d

    def _respond(
        self, data: bytes, tcp: bool, *, rcode: int = 0, rrs: tuple[bytes, int] = (b"", 0)
    ) -> StubResult:
        """Answer ``data`` (one parsed question) with ``rcode`` and prebuilt answer records."""
        fast = _fast_response(data, rcode, rrs)
        if fast is not None:
            return Answer(fast)
        # Unusual queries (records besides one OPT, EDNS options to skip, ...) go through dnspython.
        try:
            query = dns.message.from_wire(data)
        except (dns.exception.DNSException, ValueError):
            self._count("formerr")
            return Answer(error_response(data, dns.rcode.FORMERR))
        resp = dns.message.make_response(query, recursion_available=True, our_payload=EDNS_PAYLOAD)
        resp.set_rcode(dns.rcode.Rcode(rcode))
        if query.ednsflags & dns.flags.DO:
            resp.ednsflags |= dns.flags.DO
        wire = resp.to_wire()
        if rrs[1]:
            # Splice the prebuilt records in right after the question (header ANCOUNT updated).
            qend = _question_end(wire)
            wire = wire[:6] + struct.pack("!H", rrs[1]) + wire[8:qend] + rrs[0] + wire[qend:]
        if not tcp:
            limit = max(UDP_PLAIN_LIMIT, min(query.payload, EDNS_PAYLOAD)) if query.edns >= 0 \
                else UDP_PLAIN_LIMIT
            if len(wire) > limit:
                return Answer(resp.to_wire(max_size=limit))  # pragma: no cover - answers are small
        return Answer(wire)

    # --- lookups for the client ---------------------------------------------------------------------
    def poll_event(self) -> DnsEvent | None:
        """Return the next event, or None."""
        return self._events.popleft() if self._events else None

    def resolve_proxy_ip(self, ip: str) -> tuple[str, str] | None:
        """Return ``(resource_id, domain)`` for an assigned proxy IP of a current resource."""
        d = self._by_ip.get(ip)
        if d is None:
            try:
                d = self._by_ip.get(str(ipaddress.ip_address(ip)))
            except ValueError:
                return None
            if d is None:
                return None
        if d.resource_id is None:
            return None
        return d.resource_id, d.name

    def proxy_ips_of(self, domain: str) -> list[str]:
        """Return the 4 IPv4 + 4 IPv6 proxy IPs of ``domain`` (empty if it has none yet)."""
        d = self._domains.get(normalize_name(domain))
        return d.v4 + d.v6 if d is not None else []

    # --- helpers ----------------------------------------------------------------------------------
    def _drop(self, reason: str) -> Drop:
        self._count(reason)
        return Drop(reason)

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

