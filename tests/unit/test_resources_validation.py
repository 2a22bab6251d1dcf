"""Resource validation: types, addresses, names, filters, wire form."""

from __future__ import annotations

import ipaddress
import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firezone.portal.domain.resources import (
    ValidationError,
    filters_to_wire,
    infer_type,
    normalize_filters,
    parse_filter_spec,
    validate_resource,
)


def _resource(**kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "type": None,
        "address": None,
        "name": "res",
        "address_description": None,
        "filters": [],
    }
    args.update(kw)
    return validate_resource(**args)


def _error(**kw: Any) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        _resource(**kw)
    return info.value


# --------------------------------------------------------------------------------------------
# ValidationError


def test_validation_error_shape() -> None:
    e = ValidationError("filters[0].ports[1]", "port 0 is outside 1-65535")
    assert isinstance(e, ValueError)
    assert e.field == "filters[0].ports[1]"
    assert e.message == "port 0 is outside 1-65535"
    assert str(e) == "filters[0].ports[1]: port 0 is outside 1-65535"


# --------------------------------------------------------------------------------------------
# type inference


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("10.0.0.1", "ip"),
        ("2001:db8::1", "ip"),
        (" 192.0.2.7 ", "ip"),
        ("10.0.0.0/8", "cidr"),
        ("10.1.2.3/8", "cidr"),
        ("2001:db8::/32", "cidr"),
        ("example.com", "dns"),
        ("*.example.com", "dns"),
        ("10.0.0.0/33", "dns"),  # not a network, so validation reports it as a bad name
    ],
)
def test_infer_type(address: str, expected: str) -> None:
    assert infer_type(address) == expected


def test_inferred_type_is_never_internet() -> None:
    assert _error(address=None).field == "address"
    assert _resource(type="internet")["type"] == "internet"


# --------------------------------------------------------------------------------------------
# ip and cidr


@pytest.mark.parametrize(
    ("rtype", "address", "normalized"),
    [
        ("ip", "192.0.2.7", "192.0.2.7"),
        ("ip", "192.0.2.7/32", "192.0.2.7"),
        ("ip", "2001:DB8:0:0::1", "2001:db8::1"),
        ("ip", "2001:db8::1/128", "2001:db8::1"),
        (None, "198.51.100.1", "198.51.100.1"),
        ("cidr", "10.0.0.0/8", "10.0.0.0/8"),
        ("cidr", "10.1.2.3/8", "10.0.0.0/8"),  # host bits normalized away
        ("cidr", "192.0.2.7", "192.0.2.7/32"),
        ("cidr", "2001:db8::1/32", "2001:db8::/32"),
        (None, "172.16.5.0/20", "172.16.0.0/20"),
        ("cidr", "100.128.0.0/10", "100.128.0.0/10"),  # just above the reserved range
        ("cidr", "100.0.0.0/10", "100.0.0.0/10"),  # just below it
        ("cidr", "fd00:2021:1112::/48", "fd00:2021:1112::/48"),
        ("cidr", "128.0.0.0/1", "128.0.0.0/1"),
        ("ip", "169.254.1.1", "169.254.1.1"),
    ],
)
def test_ip_and_cidr_are_normalized(rtype: str | None, address: str, normalized: str) -> None:
    r = _resource(type=rtype, address=address)
    assert r["address"] == normalized
    assert r["type"] == (rtype or ("cidr" if "/" in address else "ip"))


@pytest.mark.parametrize(
    ("rtype", "address", "message"),
    [
        ("ip", "10.0.0.0/8", "is a network; use a resource of type cidr"),
        ("ip", "example.com", "not a single IPv4 or IPv6 address"),
        ("ip", "10.0.0.1/abc", "invalid prefix length"),
        ("ip", "10.0.0.1/33", "invalid prefix length"),
        ("ip", "10.0.0.1/²", "invalid prefix length"),
        ("ip", "x/32", "not an IP address"),
        ("ip", "10.0.0.1:80", "must not contain a port"),
        ("ip", "[2001:db8::1]:443", "must not contain a port"),
        ("ip", "fe80::1%eth0", "zone index"),
        ("cidr", "10.0.0.0/33", "not an IPv4 or IPv6 network"),
        ("cidr", "example.com", "not an IPv4 or IPv6 network"),
        ("cidr", "0.0.0.0/0", "full tunnel; use the internet resource"),
        ("cidr", "::/0", "full tunnel; use the internet resource"),
        (None, "0.0.0.0/0", "full tunnel; use the internet resource"),
        (None, "1.2.3.4/0", "full tunnel; use the internet resource"),
        ("ip", "127.0.0.1", "127.0.0.1 includes loopback addresses (127.0.0.0/8)"),
        ("cidr", "127.0.0.0/8", "loopback"),
        ("cidr", "126.0.0.0/7", "loopback"),
        ("cidr", "0.0.0.0/1", "loopback"),
        ("ip", "::1", "loopback"),
        ("cidr", "::/127", "loopback"),
        ("ip", "::ffff:127.0.0.1", "maps to 127.0.0.1/32"),
        ("ip", "100.64.0.1", "overlaps the reserved tunnel range 100.64.0.0/10"),
        ("ip", "100.127.255.255", "100.64.0.0/10"),
        ("cidr", "100.0.0.0/8", "100.64.0.0/10"),
        ("cidr", "100.96.0.0/11", "100.64.0.0/10"),
        ("ip", "fd00:2021:1111::5", "fd00:2021:1111::/48"),
        ("cidr", "fd00::/8", "fd00:2021:1111::/48"),
        ("ip", "0.0.0.0", "unspecified address"),
        ("ip", "::", "unspecified address"),
    ],
)
def test_bad_ip_and_cidr(rtype: str | None, address: str, message: str) -> None:
    e = _error(type=rtype, address=address)
    assert e.field == "address"
    assert message in e.message


def test_address_is_required_for_addressed_types() -> None:
    for rtype in ("ip", "cidr", "dns"):
        e = _error(type=rtype, address="  ")
        assert (e.field, e.message) == ("address", f"is required for a {rtype} resource")


# --------------------------------------------------------------------------------------------
# dns and internet


def test_dns_address_goes_through_pattern_validation() -> None:
    r = _resource(address="*.Corp.Example.com.")
    assert (r["type"], r["address"]) == ("dns", "*.corp.example.com")
    e = _error(type="dns", address="**.com")
    assert e.field == "address"
    assert "must name a domain under '.com'" in e.message
    assert _error(type="dns", address="10.0.0.1").message == (
        "is an IP address; use a resource of type ip"
    )


def test_internet_has_no_address() -> None:
    r = _resource(type="internet", address="")
    assert r["address"] is None
    e = _error(type="internet", address="0.0.0.0/0")
    assert e.field == "address"
    assert "must be empty" in e.message


def test_unknown_type() -> None:
    e = _error(type="device_pool", address="x.example.com")
    assert e.field == "type"
    assert "must be one of ip, cidr, dns, internet" in e.message


def test_type_is_case_insensitive() -> None:
    assert _resource(type="CIDR", address="10.0.0.0/8")["type"] == "cidr"


# --------------------------------------------------------------------------------------------
# name and description


def test_name_is_trimmed_and_bounded() -> None:
    assert _resource(address="a.example.com", name="  Wiki  ")["name"] == "Wiki"
    assert _resource(address="a.example.com", name="n" * 255)["name"] == "n" * 255
    assert _error(address="a.example.com", name="n" * 256).field == "name"
    assert "at most 255" in _error(address="a.example.com", name="n" * 256).message
    assert _error(address="a.example.com", name="   ").message == "must not be empty"
    assert _error(address="a.example.com", name=None).message == "is required"
    assert _error(address="a.example.com", name=7).message == "must be a string"


def test_address_description() -> None:
    assert _resource(address="a.example.com", address_description="")["address_description"] is None
    ok = _resource(address="a.example.com", address_description="https://wiki/")
    assert ok["address_description"] == "https://wiki/"
    e = _error(address="a.example.com", address_description="d" * 256)
    assert e.field == "address_description"


def test_result_has_exactly_the_normalized_fields() -> None:
    assert _resource(address="192.0.2.1") == {
        "type": "ip",
        "address": "192.0.2.1",
        "name": "res",
        "address_description": None,
        "filters": [],
    }


# --------------------------------------------------------------------------------------------
# filters


def test_filters_normalized() -> None:
    filters = [
        {"protocol": "TCP", "ports": ["443", "80", "8000-8100", 8050, "8101"]},
        {"protocol": "udp", "ports": []},
        {"protocol": "icmp"},
        {"protocol": "tcp", "ports": ["22"]},
    ]
    assert normalize_filters(filters) == [
        {"protocol": "tcp", "ports": ["22", "80", "443", "8000-8101"]},
        {"protocol": "udp", "ports": []},
        {"protocol": "icmp", "ports": []},
    ]


def test_all_ports_entry_wins_over_specific_ports() -> None:
    assert normalize_filters([{"protocol": "tcp", "ports": ["80"]}, {"protocol": "tcp"}]) == [
        {"protocol": "tcp", "ports": []}
    ]
    assert normalize_filters([{"protocol": "tcp"}, {"protocol": "tcp", "ports": ["80"]}]) == [
        {"protocol": "tcp", "ports": []}
    ]


def test_filters_accept_cli_strings() -> None:
    assert normalize_filters(["tcp/80,443", "icmp"]) == [
        {"protocol": "tcp", "ports": ["80", "443"]},
        {"protocol": "icmp", "ports": []},
    ]


def test_none_and_empty_filters_allow_everything() -> None:
    assert normalize_filters(None) == []
    assert normalize_filters([]) == []


@pytest.mark.parametrize(
    ("filters", "field", "message"),
    [
        ("tcp/80", "filters", "must be a list"),
        ([42], "filters[0]", "must be an object"),
        ([{"protocol": "sctp"}], "filters[0].protocol", "must be one of tcp, udp, icmp"),
        ([{"ports": ["80"]}], "filters[0].protocol", "must be one of tcp, udp, icmp"),
        ([{"protocol": "tcp", "port": 80}], "filters[0]", "unknown key(s): port"),
        ([{"protocol": "tcp", "ports": ["0"]}], "filters[0].ports[0]", "port 0 is outside 1-65535"),
        (
            [{"protocol": "udp", "ports": ["53", "65536"]}],
            "filters[0].ports[1]",
            "port 65536 is outside 1-65535",
        ),
        (
            [{"protocol": "tcp", "ports": ["2000-1000"]}],
            "filters[0].ports[0]",
            "starts after it ends",
        ),
        ([{"protocol": "tcp", "ports": ["http"]}], "filters[0].ports[0]", "not a port number"),
        ([{"protocol": "tcp", "ports": ["-5"]}], "filters[0].ports[0]", "not a port number"),
        ([{"protocol": "tcp", "ports": [True]}], "filters[0].ports[0]", "not a port number"),
        ([{"protocol": "tcp", "ports": {"a": 1}}], "filters[0].ports", "must be a list"),
        ([{"protocol": "icmp", "ports": ["1"]}], "filters[0].ports", "icmp has no ports"),
        (["tcp"], None, None),
        ([{"protocol": "tcp"}, "udp/0"], "filters[1]", "port 0 is outside 1-65535"),
    ],
)
def test_bad_filters(filters: Any, field: str | None, message: str | None) -> None:
    if field is None or message is None:
        _resource(address="a.example.com", filters=filters)
        return
    e = _error(address="a.example.com", filters=filters)
    assert e.field == field
    assert message in e.message


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("tcp/80", {"protocol": "tcp", "ports": ["80"]}),
        ("udp/1000-2000", {"protocol": "udp", "ports": ["1000-2000"]}),
        ("tcp/80,443", {"protocol": "tcp", "ports": ["80", "443"]}),
        ("TCP/443, 80", {"protocol": "tcp", "ports": ["80", "443"]}),
        ("tcp/80-80", {"protocol": "tcp", "ports": ["80"]}),
        ("tcp/1-10,5-20", {"protocol": "tcp", "ports": ["1-20"]}),
        ("tcp", {"protocol": "tcp", "ports": []}),
        ("icmp", {"protocol": "icmp", "ports": []}),
        (" udp/53 ", {"protocol": "udp", "ports": ["53"]}),
    ],
)
def test_parse_filter_spec(spec: str, expected: dict[str, Any]) -> None:
    assert parse_filter_spec(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty filter"),
        ("http/80", "unknown protocol 'http'"),
        ("tcp/", "no ports after '/'"),
        ("tcp/80,", "empty port"),
        ("icmp/8", "icmp has no ports"),
        ("udp/70000", "outside 1-65535"),
        ("tcp/9-1", "starts after it ends"),
        ("tcp/a-b", "not a port number"),
        ("tcp/²", "not a port number"),
        ("tcp/٨٠", "not a port number"),
    ],
)
def test_parse_filter_spec_errors(spec: str, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_filter_spec(spec)
    assert info.value.field == "filters"
    assert message in info.value.message


def test_filters_to_wire() -> None:
    filters = normalize_filters(["tcp/80,443,8000-8100", "udp", "icmp"])
    assert filters_to_wire(filters) == [
        {"protocol": "tcp", "port_range_start": 80, "port_range_end": 80},
        {"protocol": "tcp", "port_range_start": 443, "port_range_end": 443},
        {"protocol": "tcp", "port_range_start": 8000, "port_range_end": 8100},
        {"protocol": "udp", "port_range_start": 0, "port_range_end": 65535},
        {"protocol": "icmp"},
    ]
    assert filters_to_wire([]) == []


_port_ranges = st.tuples(st.integers(1, 65535), st.integers(0, 300)).map(
    lambda t: (t[0], min(65535, t[0] + t[1]))
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_port_ranges, min_size=1, max_size=8), st.sampled_from(["tcp", "udp"]))
def test_filter_normalization_keeps_the_same_port_set(
    ranges: list[tuple[int, int]], proto: str
) -> None:
    ports = [f"{lo}-{hi}" if lo != hi else str(lo) for lo, hi in ranges]
    wire = filters_to_wire(normalize_filters([{"protocol": proto, "ports": ports}]))
    allowed: set[int] = set()
    for w in wire:
        allowed.update(range(w["port_range_start"], w["port_range_end"] + 1))
    expected: set[int] = set()
    for lo, hi in ranges:
        expected.update(range(lo, hi + 1))
    assert allowed == expected
    # normalized ranges are sorted, disjoint and non-adjacent
    bounds = [(w["port_range_start"], w["port_range_end"]) for w in wire]
    assert all(a[1] + 1 < b[0] for a, b in itertools.pairwise(bounds))
    # and normalization is idempotent
    once = normalize_filters([{"protocol": proto, "ports": ports}])
    assert normalize_filters(once) == once


# --------------------------------------------------------------------------------------------
# random networks vs an independent statement of the rules

_V4_BASES = [0, 0x7F000000, 0x64400000, 0x647FFFFF, 0x64000000, 0x0A000000, 0xC0000200, 0xFFFFFFFF]
_V6_BASES = [
    0,
    1,
    int(ipaddress.IPv6Address("fd00:2021:1111::")),
    int(ipaddress.IPv6Address("fd00:2021:1110:ffff::")),
    int(ipaddress.IPv6Address("2001:db8::")),
    int(ipaddress.IPv6Address("::ffff:127.0.0.1")),
    int(ipaddress.IPv6Address("::ffff:100.64.0.1")),
    int(ipaddress.IPv6Address("::ffff:192.0.2.1")),
]


def _expected_error(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    if net.prefixlen == 0:
        return True
    if net.version == 4:
        bad = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("100.64.0.0/10")]
        if net == ipaddress.ip_network("0.0.0.0/32"):
            return True
    else:
        bad = [ipaddress.ip_network("::1/128"), ipaddress.ip_network("fd00:2021:1111::/48")]
        if net == ipaddress.ip_network("::/128"):
            return True
        mapped = net.network_address.ipv4_mapped  # type: ignore[union-attr]
        if mapped is not None and net.prefixlen >= 96:
            v4 = ipaddress.ip_network(f"{mapped}/{net.prefixlen - 96}", strict=False)
            if v4.overlaps(ipaddress.ip_network("127.0.0.0/8")) or v4.overlaps(
                ipaddress.ip_network("100.64.0.0/10")
            ):
                return True
    return any(net.overlaps(b) for b in bad)  # type: ignore[arg-type]


@settings(max_examples=1500, deadline=None)
@given(
    st.one_of(
        st.tuples(
            st.just(4),
            st.sampled_from(_V4_BASES) | st.integers(0, 2**32 - 1),
            st.integers(-300, 300),
            st.integers(0, 32),
        ),
        st.tuples(
            st.just(6),
            st.sampled_from(_V6_BASES) | st.integers(0, 2**128 - 1),
            st.integers(-300, 300),
            st.integers(0, 128),
        ),
    )
)
def test_cidr_rules_hold_for_random_networks(case: tuple[int, int, int, int]) -> None:
    version, base, delta, plen = case
    top = 2**32 - 1 if version == 4 else 2**128 - 1
    cls = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    addr = cls(min(max(base + delta, 0), top))
    text = f"{addr}/{plen}"
    net = ipaddress.ip_network(text, strict=False)
    try:
        r = _resource(type="cidr", address=text)
    except ValidationError as e:
        assert e.field == "address"
        assert _expected_error(net), (text, e.message)
        return
    assert not _expected_error(net), text
    assert r["address"] == str(net)
    # a host route validates the same way as an ip resource
    if plen == net.max_prefixlen:
        assert _resource(type="ip", address=str(addr))["address"] == str(addr)


# --------------------------------------------------------------------------------------------
# robustness: any JSON in, a normalized resource or a ValidationError out

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
_addressish = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        ["10.0.0.0/8", "10.0.0.1/²", "2001:db8::/٣٢", "١٢٧.0.0.1", "a.example.com", ""]
    ),
)
_filterish = st.one_of(
    _json,
    st.lists(
        st.one_of(
            st.text(max_size=16),
            st.sampled_from(["tcp/٨٠", "udp/²", "tcp/80", "icmp", "tcp/1-65535"]),
            st.fixed_dictionaries(
                {"protocol": st.sampled_from(["tcp", "udp", "icmp", "x"]), "ports": _json}
            ),
        ),
        max_size=3,
    ),
)


@settings(max_examples=1500, deadline=None)
@given(
    st.one_of(st.none(), st.sampled_from(["ip", "cidr", "dns", "internet"]), _json),
    st.one_of(st.none(), _addressish),
    st.one_of(st.text(max_size=10), _json),
    st.one_of(st.none(), st.text(max_size=10), _json),
    _filterish,
)
def test_validate_resource_raises_only_validation_error(
    rtype: Any, address: Any, name: Any, description: Any, filters: Any
) -> None:
    try:
        r = validate_resource(
            type=rtype,
            address=address,
            name=name,
            address_description=description,
            filters=filters,
        )
    except ValidationError as e:
        assert e.field.split("[")[0].split(".")[0] in {
            "type",
            "address",
            "name",
            "address_description",
            "filters",
        }
        return
    # the normalized form validates to itself
    assert validate_resource(**r) == r
    filters_to_wire(r["filters"])


@settings(max_examples=1000, deadline=None)
@given(st.text(max_size=20))
def test_parse_filter_spec_raises_only_validation_error(spec: str) -> None:
    try:
        f = parse_filter_spec(spec)
    except ValidationError as e:
        assert e.field == "filters"
        return
    assert normalize_filters([f]) == [f]
