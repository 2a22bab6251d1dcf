"""Tunnel address allocation."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firezone.portal.domain.addresses import (
    IPV4_TUNNEL,
    IPV6_TUNNEL,
    AddressPoolExhausted,
    allocate_ip,
    allocate_pair,
)
from firezone.proto.rng import SeededRng


class FixedRng:
    """An Rng whose randbelow always returns ``value`` (to test the probing order)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def token_bytes(self, n: int) -> bytes:
        return bytes(n)

    def randbelow(self, n: int) -> int:
        assert 0 <= self.value < n
        return self.value

    def random(self) -> float:
        return 0.0


def test_allocates_inside_the_standard_ranges() -> None:
    v4, v6 = allocate_pair(set(), set(), SeededRng(1))
    assert ipaddress.ip_address(v4) in ipaddress.ip_network(IPV4_TUNNEL)
    assert ipaddress.ip_address(v6) in ipaddress.ip_network(IPV6_TUNNEL)
    assert v6 == str(ipaddress.ip_address(v6))  # normalized form


def test_same_seed_same_address_different_seeds_spread() -> None:
    assert allocate_ip(IPV4_TUNNEL, set(), SeededRng(7)) == allocate_ip(
        IPV4_TUNNEL, set(), SeededRng(7)
    )
    picks = {allocate_ip(IPV4_TUNNEL, set(), SeededRng(s)) for s in range(50)}
    assert len(picks) == 50


def test_start_offset_maps_to_first_usable_address() -> None:
    assert allocate_ip("10.0.0.0/29", set(), FixedRng(0)) == "10.0.0.1"
    assert allocate_ip("10.0.0.0/29", set(), FixedRng(5)) == "10.0.0.6"


def test_linear_probe_skips_taken_and_wraps_around() -> None:
    used = {"10.0.0.5", "10.0.0.6"}
    assert allocate_ip("10.0.0.0/29", used, FixedRng(4)) == "10.0.0.1"
    assert allocate_ip("10.0.0.0/29", {"10.0.0.3"}, FixedRng(2)) == "10.0.0.4"


def test_never_hands_out_network_or_broadcast() -> None:
    rng = SeededRng(3)
    used: set[str] = set()
    for _ in range(6):
        used.add(allocate_ip("192.0.2.0/29", used, rng))
    assert used == {f"192.0.2.{i}" for i in range(1, 7)}
    with pytest.raises(AddressPoolExhausted, match="no free address left in 192.0.2.0/29"):
        allocate_ip("192.0.2.0/29", used, rng)


def test_exhaustion_ignores_addresses_outside_the_network() -> None:
    used = {f"192.0.2.{i}" for i in range(1, 6)} | {"198.51.100.1", "garbage"}
    assert allocate_ip("192.0.2.0/29", used, SeededRng(0)) == "192.0.2.6"


def test_ipv6_range_fills_up_too() -> None:
    rng = SeededRng(9)
    used: set[str] = set()
    for _ in range(14):
        used.add(allocate_ip("fd00:2021:1111::/124", used, rng))
    assert "fd00:2021:1111::" not in used and "fd00:2021:1111::f" not in used
    with pytest.raises(AddressPoolExhausted):
        allocate_ip("fd00:2021:1111::/124", used, rng)


@pytest.mark.parametrize("network", ["10.0.0.1/24", "not-a-net", "10.0.0.0/31", "10.0.0.0/32"])
def test_bad_networks(network: str) -> None:
    with pytest.raises(ValueError):
        allocate_ip(network, set(), SeededRng(0))


@settings(max_examples=200, deadline=None)
@given(st.sets(st.integers(1, 62), max_size=61), st.integers(0, 2**32))
def test_returns_a_free_usable_address(taken: set[int], seed: int) -> None:
    used = {f"10.9.8.{i}" for i in taken}
    got = allocate_ip("10.9.8.0/26", used, SeededRng(seed))
    assert got not in used
    assert 1 <= int(got.rsplit(".", 1)[1]) <= 62


class LazyTaken:
    """A store-backed `used` collection: membership is cheap, iterating means a full scan."""

    def __init__(self, taken: set[str]) -> None:
        self.taken = taken
        self.iterated = 0

    def __contains__(self, item: object) -> bool:
        return item in self.taken

    def __len__(self) -> int:
        return len(self.taken)

    def __iter__(self):  # type: ignore[no-untyped-def]
        self.iterated += 1
        return iter(self.taken)


def test_lazy_collection_is_not_scanned_unless_nearly_full() -> None:
    used = LazyTaken({f"100.64.0.{i}" for i in range(1, 200)})
    got = allocate_ip(IPV4_TUNNEL, used, SeededRng(4))
    assert got not in used.taken
    assert used.iterated == 0
    full = LazyTaken({f"10.0.0.{i}" for i in range(1, 7)})
    with pytest.raises(AddressPoolExhausted):
        allocate_ip("10.0.0.0/29", full, SeededRng(4))
    assert full.iterated == 1
