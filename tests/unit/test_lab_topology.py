"""The lab's static parts: topology data, router ruleset, DNS config, HTTP payloads (no root)."""

from __future__ import annotations

import hashlib
import ipaddress

import pytest

from firezone.lab import router_ruleset
from firezone.lab import topology as topo
from firezone.lab.httpd import payload, payload_sha256

DOC_NETS = [
    ipaddress.ip_network(n)
    for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
]


def all_ifaces() -> list[topo.Iface]:
    return [i for n in topo.NODES.values() for i in n.ifaces.values()]


def test_every_address_is_a_documentation_address() -> None:
    for iface in all_ifaces():
        for cidr in (iface.v4, iface.v6):
            net = ipaddress.ip_interface(cidr).network
            assert any(net.subnet_of(d) for d in DOC_NETS if d.version == net.version), cidr  # type: ignore[arg-type]


def test_addresses_are_unique_and_on_existing_devices() -> None:
    seen: dict[str, str] = {}
    veth_ends = {(a, da) for a, da, _, _ in topo.VETHS} | {(b, db) for _, _, b, db in topo.VETHS}
    bridges = {(ns, br) for ns, (br, _) in topo.BRIDGES.items()}
    for node in topo.NODES.values():
        for iface in node.ifaces.values():
            assert (iface.ns, iface.dev) in veth_ends | bridges, (node.name, iface)
            for a in (topo.ip_of(iface.v4), topo.ip_of(iface.v6)):
                owner = seen.setdefault(a, node.name)
                assert owner == node.name, f"{a} on {owner} and {node.name}"


def test_device_names_fit_the_kernel_limit_and_bridge_ports_exist() -> None:
    veth_ends = {(a, da) for a, da, _, _ in topo.VETHS} | {(b, db) for _, _, b, db in topo.VETHS}
    for ns, dev in veth_ends:
        assert ns in topo.NAMESPACES and len(dev) <= 15
    for ns, (br, ports) in topo.BRIDGES.items():
        assert len(br) <= 15
        for port in ports:
            assert (ns, port) in veth_ends


def test_acceptance_addresses() -> None:
    expect = {
        "portal": "203.0.113.10",
        "relay-1": "203.0.113.101",
        "relay-2": "203.0.113.102",
        "public-dns": "203.0.113.53",
        "client-router": "203.0.113.20",
        "gateway-router": "203.0.113.30",
        "client": "192.0.2.10",
        "gateway-1": "192.0.2.130",
        "gateway-2": "192.0.2.131",
        "http": "198.51.100.10",
        "dns-host": "198.51.100.20",
        "download": "198.51.100.21",
        "iperf3": "198.51.100.30",
        "private-dns": "198.51.100.53",
    }
    for node, addr in expect.items():
        primary = topo.NODES[node].primary
        assert primary is not None and topo.ip_of(primary.v4) == addr, node


def test_default_routes_point_at_a_router_on_the_same_link() -> None:
    for ns, (gw4, gw6) in topo.DEFAULT_ROUTES.items():
        own = [i for i in all_ifaces() if i.ns == ns]
        assert any(ipaddress.ip_address(gw4) in ipaddress.ip_interface(i.v4).network for i in own)
        assert any(ipaddress.ip_address(gw6) in ipaddress.ip_interface(i.v6).network for i in own)


def test_router_ruleset_rendering() -> None:
    easy = router_ruleset(nat="easy", loss=0, block_udp_to=None)
    assert 'oifname "wan" masquerade\n' in easy and "numgen" not in easy and "udp" not in easy
    assert easy.startswith("table inet fzlab\ndelete table inet fzlab\n")
    sym = router_ruleset(
        nat="symmetric", loss=12.5, block_udp_to=("203.0.113.30", "2001:db8:113::30")
    )
    assert "masquerade random" in sym
    assert "numgen random mod 10000 < 1250" in sym
    assert 'oifname "wan" ip daddr 203.0.113.30 meta l4proto udp' in sym
    assert 'oifname "wan" ip6 daddr 2001:db8:113::30 meta l4proto udp' in sym
    with pytest.raises(ValueError, match="unknown NAT mode"):
        router_ruleset(nat="full-cone", loss=0, block_udp_to=None)
    with pytest.raises(ValueError, match="between 0 and 100"):
        router_ruleset(nat="easy", loss=101, block_udp_to=None)


def test_dnsmasq_config_is_static_and_complete() -> None:
    conf = topo.dnsmasq_conf(
        listen=("198.51.100.53", "2001:db8:51::53"),
        zones=[(topo.PRIVATE_ZONE, topo.PRIVATE_RECORDS, "198.51.100")],
        log_file="/x/q.log",
    )
    lines = conf.splitlines()
    for flag in (
        "no-resolv",
        "no-hosts",
        "bind-interfaces",
        "local=/httpbin.test/",
        "log-facility=/x/q.log",
        "listen-address=198.51.100.53",
    ):
        assert flag in lines
    assert "host-record=download.httpbin.test,198.51.100.21,2001:db8:51::21" in lines
    assert "host-record=alias.httpbin.test,198.51.100.21,2001:db8:51::21" in lines
    assert "host-record=httpbin.test,198.51.100.10,2001:db8:51::10" in lines
    assert (
        sum(line.startswith("host-record=big.httpbin.test,") for line in lines)
        == topo.BIG_RECORD_COUNT
    )


def test_http_payload_is_deterministic_and_prefix_stable() -> None:
    assert payload(0) == b""
    assert payload(1000) == payload(1000)
    assert payload(70_000)[:1000] == payload(1000)
    assert payload_sha256(70_000) == hashlib.sha256(payload(70_000)).hexdigest()
    assert len(set(payload(4096))) > 200  # not a constant pattern


def test_hostnames_by_address() -> None:
    names = topo.hostnames_by_address()
    assert names["198.51.100.21"] == "download" and names["2001:db8:51::20"] == "dns-host"
