"""Validation of the account's client settings (search domain, upstream resolvers)."""

from __future__ import annotations

import pytest

from firezone.portal.domain.account import MAX_UPSTREAMS, validate_search_domain, validate_settings, \
    validate_upstream_dns
from firezone.portal.domain.resources import ValidationError


@pytest.mark.parametrize("given,stored", [
    ("corp.example.com", "corp.example.com"),
    ("Corp.Example.COM.", "corp.example.com"),
    ("  httpbin.test ", "httpbin.test"),
    ("a-1.b2.example", "a-1.b2.example"),
    ("", None),
    (None, None),
])
def test_search_domain_accepted(given: str | None, stored: str | None) -> None:
    assert validate_search_domain(given) == stored


@pytest.mark.parametrize("bad", ["localhost", "corp", "-corp.example", "corp-.example", "a..b", "a b.example",
                                 "x" * 64 + ".example", ".".join(["abcdefgh"] * 30), "10.0.0.1", "*.corp.example",
                                 "corp_1.example", 7])
def test_search_domain_rejected_naming_the_field(bad: object) -> None:
    with pytest.raises(ValidationError) as e:
        validate_search_domain(bad)
    assert e.value.field == "search_domain"


def test_upstreams_normalized_and_deduplicated() -> None:
    assert validate_upstream_dns(["192.0.2.53", "192.0.2.53:53", "192.0.2.54:5353", "2001:db8::53",
                                  "[2001:DB8::53]:53", "[2001:db8::54]:5353"]) == \
        ["192.0.2.53", "192.0.2.54:5353", "2001:db8::53", "[2001:db8::54]:5353"]
    assert validate_upstream_dns(None) == [] and validate_upstream_dns([]) == []


@pytest.mark.parametrize("bad,field", [
    ("192.0.2.53", "upstream_dns"),
    ([1], "upstream_dns[0]"),
    (["192.0.2.53", "dns.example"], "upstream_dns[1]"),
    (["192.0.2.53:0"], "upstream_dns[0]"),
    (["192.0.2.53:70000"], "upstream_dns[0]"),
    (["[2001:db8::53]x"], "upstream_dns[0]"),
    (["0.0.0.0"], "upstream_dns[0]"),
    (["224.0.0.1"], "upstream_dns[0]"),
    ([""], "upstream_dns[0]"),
    ([f"192.0.2.{i}" for i in range(MAX_UPSTREAMS + 1)], "upstream_dns"),
])
def test_upstreams_rejected_naming_the_field(bad: object, field: str) -> None:
    with pytest.raises(ValidationError) as e:
        validate_upstream_dns(bad)
    assert e.value.field == field


def test_partial_update_keeps_only_given_keys() -> None:
    assert validate_settings({}) == {}
    assert validate_settings({"search_domain": "X.Example"}) == {"search_domain": "x.example"}
    assert validate_settings({"upstream_dns": None}) == {"upstream_dns": []}
