"""The lab's topology as data: namespaces, links, addresses, routes, DNS zones.

Everything here is static description; :mod:`firezone.lab.lab` turns it into ``ip``/``nft``
commands. Only documentation addresses are used (RFC 5737, RFC 3849).

```
                       "internet" bridge 203.0.113.0/24, 2001:db8:113::/64   (ns: inet)
   portal .10    relay-1 .101   relay-2 .102   public-dns .53 (zone example.test, www)
   client-router .20 (NAT)                     gateway-router .30 (NAT)
        | 192.0.2.0/25, 2001:db8:2::/64            | 192.0.2.128/25, 2001:db8:2:80::/64
      client .10, client-2 .11                gateway-1 .130, gateway-2 .131
                                                   | 198.51.100.0/24, 2001:db8:51::/64 (ns: res)
                                 http .10, dns-host .20, download .21, iperf3 .30, private-dns .53
```

Each router's LAN side is a bridge (device ``lan``) in the router's namespace with one veth port
per host behind it, so both clients share the client site's NAT (and its loss and blocking
rules, which match only the router's ``wan`` device) the way the two gateways share theirs.

The resource hosts share one namespace (``res``) with one address per host name; the HTTP
server answers ``/`` with the name that belongs to the address it was reached on.
"""

from __future__ import annotations

from dataclasses import dataclass

# Namespace suffixes (the full name is "<prefix>-<suffix>").
INET = "inet"
PORTAL = "portal"
RELAY1 = "relay1"
RELAY2 = "relay2"
PDNS = "pdns"
CRTR = "crtr"
CLIENT = "client"
CLIENT2 = "client2"
GRTR = "grtr"
GW1 = "gw1"
GW2 = "gw2"
RES = "res"

NAMESPACES: tuple[str, ...] = (
    INET, PORTAL, RELAY1, RELAY2, PDNS, CRTR, CLIENT, CLIENT2, GRTR, GW1, GW2, RES,
)

ROUTERS = ("client-router", "gateway-router")
NAT_MODES = ("easy", "symmetric")

PUBLIC_DNS4 = "203.0.113.53"
PUBLIC_DNS6 = "2001:db8:113::53"
PRIVATE_DNS4 = "198.51.100.53"
PRIVATE_DNS6 = "2001:db8:51::53"
PUBLIC_ZONE = "example.test"
PRIVATE_ZONE = "httpbin.test"

HTTP_PORTS = (80, 8080)
IPERF3_PORT = 5201


@dataclass(frozen=True, slots=True)
class Iface:
    """One interface of a node: its namespace, device name, and addresses (v4/prefix, v6/prefix)."""

    ns: str
    dev: str
    v4: str
    v6: str


@dataclass(frozen=True, slots=True)
class Node:
    """A name usable with ``fz lab exec``: the namespace it lives in and its interfaces by role."""

    name: str
    ns: str
    ifaces: dict[str, Iface]
    description: str

    @property
    def primary(self) -> Iface | None:
        return next(iter(self.ifaces.values()), None)


def _wan(ns: str, host: int, dev: str = "eth0") -> Iface:
    return Iface(ns, dev, f"203.0.113.{host}/24", f"2001:db8:113::{host}/64")


def _res(host: int, ns: str = RES, dev: str = "br0") -> Iface:
    return Iface(ns, dev, f"198.51.100.{host}/24", f"2001:db8:51::{host}/64")


NODES: dict[str, Node] = {
    n.name: n
    for n in (
        Node("internet", INET, {}, "the internet bridge (no address)"),
        Node("portal", PORTAL, {"wan": _wan(PORTAL, 10)}, "portal host"),
        Node("relay-1", RELAY1, {"wan": _wan(RELAY1, 101)}, "relay host 1"),
        Node("relay-2", RELAY2, {"wan": _wan(RELAY2, 102)}, "relay host 2"),
        Node("public-dns", PDNS, {"wan": _wan(PDNS, 53)}, f"dnsmasq, zone {PUBLIC_ZONE}; www.{PUBLIC_ZONE} on 80"),
        Node("client-router", CRTR, {
            "wan": _wan(CRTR, 20, "wan"),
            "lan": Iface(CRTR, "lan", "192.0.2.1/25", "2001:db8:2::1/64"),
        }, "NAT router of the client site"),
        Node("client", CLIENT, {"lan": Iface(CLIENT, "eth0", "192.0.2.10/25", "2001:db8:2::10/64")},
             "client host"),
        Node("client-2", CLIENT2, {"lan": Iface(CLIENT2, "eth0", "192.0.2.11/25", "2001:db8:2::11/64")},
             "second client host (same router as client)"),
        Node("gateway-router", GRTR, {
            "wan": _wan(GRTR, 30, "wan"),
            "lan": Iface(GRTR, "lan", "192.0.2.129/25", "2001:db8:2:80::1/64"),
        }, "NAT router of the gateway site"),
        Node("gateway-1", GW1, {
            "lan": Iface(GW1, "eth0", "192.0.2.130/25", "2001:db8:2:80::130/64"),
            "res": _res(130, GW1, "res0"),
        }, "gateway host 1"),
        Node("gateway-2", GW2, {
            "lan": Iface(GW2, "eth0", "192.0.2.131/25", "2001:db8:2:80::131/64"),
            "res": _res(131, GW2, "res0"),
        }, "gateway host 2"),
        Node("http", RES, {"res": _res(10)}, "HTTP server on 80 and 8080"),
        Node("dns-host", RES, {"res": _res(20)}, "HTTP server, target of DNS resources"),
        Node("download", RES, {"res": _res(21)}, "HTTP server, /bytes/N downloads"),
        Node("iperf3", RES, {"res": _res(30)}, "iperf3 -s"),
        Node("private-dns", RES, {"res": Iface(RES, "br0", PRIVATE_DNS4 + "/24", PRIVATE_DNS6 + "/64")},
             f"dnsmasq, zone {PRIVATE_ZONE} (gateways only)"),
    )
}

# veth pairs: (ns_a, dev_a, ns_b, dev_b). Bridge ports are enslaved below.
VETHS: tuple[tuple[str, str, str, str], ...] = (
    (PORTAL, "eth0", INET, PORTAL),
    (RELAY1, "eth0", INET, RELAY1),
    (RELAY2, "eth0", INET, RELAY2),
    (PDNS, "eth0", INET, PDNS),
    (CRTR, "wan", INET, CRTR),
    (GRTR, "wan", INET, GRTR),
    (CLIENT, "eth0", CRTR, CLIENT),
    (CLIENT2, "eth0", CRTR, CLIENT2),
    (GW1, "eth0", GRTR, GW1),
    (GW2, "eth0", GRTR, GW2),
    (GW1, "res0", RES, GW1),
    (GW2, "res0", RES, GW2),
)

# bridges: ns -> (bridge device, ports)
BRIDGES: dict[str, tuple[str, tuple[str, ...]]] = {
    INET: ("br0", (PORTAL, RELAY1, RELAY2, PDNS, CRTR, GRTR)),
    CRTR: ("lan", (CLIENT, CLIENT2)),
    GRTR: ("lan", (GW1, GW2)),
    RES: ("br0", (GW1, GW2)),
}

# default routes: ns -> (v4 gateway, v6 gateway)
DEFAULT_ROUTES: dict[str, tuple[str, str]] = {
    CLIENT: ("192.0.2.1", "2001:db8:2::1"),
    CLIENT2: ("192.0.2.1", "2001:db8:2::1"),
    GW1: ("192.0.2.129", "2001:db8:2:80::1"),
    GW2: ("192.0.2.129", "2001:db8:2:80::1"),
}

# Namespaces that forward packets: the routers, and the gateways (fz gateway routes from its TUN
# device to the resource net, as a container runtime's sysctl would allow).
FORWARDING: tuple[str, ...] = (CRTR, GRTR, GW1, GW2)

# Which resolver each namespace's /etc/netns/<ns>/resolv.conf points at.
RESOLVER: dict[str, str] = {
    **{ns: PUBLIC_DNS4 for ns in NAMESPACES},
    GW1: PRIVATE_DNS4,
    GW2: PRIVATE_DNS4,
    RES: PRIVATE_DNS4,
}

ROUTER_NS = {"client-router": CRTR, "gateway-router": GRTR}
# The other site's public addresses, for "UDP between the two sites blocked".
OTHER_SITE = {"client-router": "gateway-router", "gateway-router": "client-router"}


def ip_of(cidr: str) -> str:
    return cidr.split("/", 1)[0]


def _records(zone: str, hosts: dict[str, tuple[str, str]]) -> list[tuple[str, str, str]]:
    return [(f"{h}.{zone}" if h else zone, a4, a6) for h, (a4, a6) in hosts.items()]


def _addrs(node: str) -> tuple[str, str]:
    p = NODES[node].primary
    assert p is not None
    return ip_of(p.v4), ip_of(p.v6)


PUBLIC_RECORDS: list[tuple[str, str, str]] = _records(PUBLIC_ZONE, {
    "portal": _addrs("portal"),
    "relay-1": _addrs("relay-1"),
    "relay-2": _addrs("relay-2"),
    "dns": _addrs("public-dns"),
    "www": _addrs("public-dns"),          # the lab httpd on the public DNS host
    "client-router": _addrs("client-router"),
    "gateway-router": _addrs("gateway-router"),
})

PRIVATE_RECORDS: list[tuple[str, str, str]] = _records(PRIVATE_ZONE, {
    "": _addrs("http"),
    "http": _addrs("http"),
    "dns": _addrs("dns-host"),
    "download": _addrs("download"),
    "alias": _addrs("download"),          # shares download's address (dns-shared-ip)
    "iperf3": _addrs("iperf3"),
    "deep.sub": _addrs("dns-host"),       # two labels below the apex (** vs * patterns)
    "a.b.c": _addrs("dns-host"),
})

# A name with enough A records that a UDP answer without EDNS (512 bytes) is truncated.
BIG_RECORD_COUNT = 40


def big_addresses(net: str) -> list[str]:
    """Addresses of big.<zone>: unassigned documentation addresses of the zone's network."""
    return [f"{net}.{150 + i}" for i in range(BIG_RECORD_COUNT)]


def dnsmasq_conf(*, listen: tuple[str, str], zones: list[tuple[str, list[tuple[str, str, str]], str]],
                 log_file: str) -> str:
    """A dnsmasq configuration answering only from static records (no upstream, no /etc/hosts).

    ``zones``: (zone, records (name, a, aaaa), network prefix for big.<zone>).
    """
    lines = [
        "no-resolv",
        "no-hosts",
        "bind-interfaces",
        f"listen-address={listen[0]}",
        f"listen-address={listen[1]}",
        "port=53",
        "user=root",
        "group=root",
        "cache-size=0",
        "log-queries",
        f"log-facility={log_file}",
    ]
    for zone, records, net in zones:
        lines.append(f"local=/{zone}/")
        for name, a4, a6 in records:
            lines.append(f"host-record={name},{a4},{a6}")
        for a in big_addresses(net):
            lines.append(f"host-record=big.{zone},{a}")
        lines.append(f'txt-record=txt.{zone},"fz lab {zone}"')
    return "\n".join(lines) + "\n"


def hostnames_by_address() -> dict[str, str]:
    """Address -> node name for the resource hosts (used by the lab's HTTP server)."""
    out: dict[str, str] = {}
    for node in NODES.values():
        if node.ns != RES:
            continue
        for iface in node.ifaces.values():
            out[ip_of(iface.v4)] = node.name
            out[ip_of(iface.v6)] = node.name
    return out
