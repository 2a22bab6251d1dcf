"""The policy engine: condition validation, CLI syntax, decisions, time windows across DST."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from firezone.portal.domain import policies
from firezone.portal.domain.policies import (
    REASON_ALLOWED,
    REASON_DISABLED,
    REASON_NO_POLICY,
    REASON_VIOLATED,
    Decision,
    EvalContext,
    PolicyInput,
    evaluate,
    evaluate_policy,
    explain_lines,
    parse_condition_cli,
    validate_condition,
    validate_conditions,
)
from firezone.portal.domain.resources import ValidationError

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
WEDNESDAY_NOON = datetime(2026, 6, 3, 12, 0, tzinfo=UTC)


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def cond(prop: str, op: Any, *values: Any) -> dict[str, Any]:
    return {"property": prop, "operator": op, "values": list(values)}


def pol(pid: str, *conditions: dict[str, Any], disabled: bool = False) -> PolicyInput:
    return PolicyInput(pid, "g1", "r1", tuple(conditions), disabled=disabled)


def ctx(
    now: datetime = WEDNESDAY_NOON,
    *,
    ip: str | None = "192.0.2.10",
    provider: str | None = "prov-a",
    verified: bool = False,
    token: datetime | None = None,
) -> EvalContext:
    return EvalContext(
        now=now,
        remote_ip=ip,
        provider_id=provider,
        client_verified=verified,
        token_expires_at=token,
    )


def time_cond(*values: Any) -> dict[str, Any]:
    return cond("current_utc_datetime", "is_in_day_of_week_time_ranges", *values)


# --------------------------------------------------------------------------------------------
# validate_condition


@pytest.mark.parametrize(
    ("given_", "expected"),
    [
        (
            cond("remote_ip", "is_in_cidr", "10.1.2.3/8", "192.0.2.7", "2001:db8::/32"),
            cond("remote_ip", "is_in_cidr", "10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"),
        ),
        (
            cond("remote_ip", "is_not_in_cidr", "10.0.0.0/8", "10.0.0.0/8"),
            cond("remote_ip", "is_not_in_cidr", "10.0.0.0/8"),
        ),
        (cond("provider_id", "is_in", " p1 ", "p2"), cond("provider_id", "is_in", "p1", "p2")),
        (cond("auth_provider_id", "is_not_in", "p1"), cond("provider_id", "is_not_in", "p1")),
        (cond("client_verified", "is", "true"), cond("client_verified", "is", "true")),
        (cond("client_verified", "is", True), cond("client_verified", "is", "true")),
        (
            time_cond("m/9-17/Europe/Berlin", "T/true/UTC", "W/00:00-24:00/UTC"),
            time_cond("M/09:00-17:00/Europe/Berlin", "T/true/UTC", "W/true/UTC"),
        ),
        (
            time_cond("F/13:00-14:00:30, 08:00-12:00,12:00-13:00/America/New_York"),
            time_cond("F/08:00-14:00:30/America/New_York"),
        ),
        (
            time_cond("S/10:00-11:00,09:30-10:30/America/Argentina/Buenos_Aires"),
            time_cond("S/09:30-11:00/America/Argentina/Buenos_Aires"),
        ),
    ],
)
def test_validate_condition_normalizes(given_: dict[str, Any], expected: dict[str, Any]) -> None:
    assert validate_condition(given_) == expected
    assert validate_condition(expected) == expected  # idempotent


@pytest.mark.parametrize(
    ("given_", "field", "message"),
    [
        ("remote_ip", "conditions[3]", "must be an object"),
        (
            {**cond("remote_ip", "is_in_cidr", "10.0.0.0/8"), "x": 1},
            "conditions[3]",
            "unknown key(s): x",
        ),
        (cond("country", "is_in", "DE"), "conditions[3].property", "must be one of"),
        (
            {"property": ["remote_ip"], "operator": "is_in_cidr", "values": ["10.0.0.0/8"]},
            "conditions[3].property",
            "must be one of",
        ),
        (
            cond("remote_ip", ["is_in_cidr"], "10.0.0.0/8"),
            "conditions[3].operator",
            "takes operator",
        ),
        (
            time_cond("M/true/Europe/Berlin\x00"),
            "conditions[3].values[0]",
            "unknown IANA time zone",
        ),
        (time_cond("M/true/" + "x" * 300), "conditions[3].values[0]", "unknown IANA time zone"),
        (time_cond("M/true/europe/berlin"), "conditions[3].values[0]", "unknown IANA time zone"),
        (
            cond("remote_ip", "is_in", "10.0.0.0/8"),
            "conditions[3].operator",
            "remote_ip takes operator is_in_cidr or is_not_in_cidr, not 'is_in'",
        ),
        (cond("client_verified", "is_in", "true"), "conditions[3].operator", "takes operator is"),
        (cond("remote_ip", "is_in_cidr"), "conditions[3].values", "must be a non-empty list"),
        (
            {"property": "remote_ip", "operator": "is_in_cidr", "values": "10.0.0.0/8"},
            "conditions[3].values",
            "must be a non-empty list",
        ),
        (
            cond("remote_ip", "is_in_cidr", "10.0.0.0/8", "10.0.0.0/33"),
            "conditions[3].values[1]",
            "is not an IP address or CIDR",
        ),
        (cond("remote_ip", "is_in_cidr", 10), "conditions[3].values[0]", "not an IP address"),
        (cond("provider_id", "is_in", ""), "conditions[3].values[0]", "non-empty provider id"),
        (cond("client_verified", "is", "false"), "conditions[3].values[0]", 'must be "true"'),
        (
            time_cond("X/true/UTC"),
            "conditions[3].values[0]",
            "day 'X' must be one of M T W R F S U",
        ),
        (time_cond("MX/true/UTC"), "conditions[3].values[0]", "must be one of M T W R F S U"),
        (time_cond("Mon-Fry/true/UTC"), "conditions[3].values[0]", "day 'Mon-Fry' must be one of"),
        (time_cond("Monkey/true/UTC"), "conditions[3].values[0]", "must be one of"),
        (time_cond("M/true"), "conditions[3].values[0]", "must look like '<D>/<ranges>/<IANA"),
        (time_cond("M/true/"), "conditions[3].values[0]", "has no time zone"),
        (
            time_cond("M/true/Mars/Olympus"),
            "conditions[3].values[0]",
            "unknown IANA time zone 'Mars/Olympus'",
        ),
        (time_cond("M/true/../../etc/passwd"), "conditions[3].values[0]", "unknown IANA time zone"),
        (time_cond("M//UTC"), "conditions[3].values[0]", "has no time ranges"),
        (time_cond("M/09:00/UTC"), "conditions[3].values[0]", "must look like HH:MM-HH:MM"),
        (time_cond("M/17:00-09:00/UTC"), "conditions[3].values[0]", "must start before it ends"),
        (time_cond("M/09:00-09:00/UTC"), "conditions[3].values[0]", "must start before it ends"),
        (time_cond("M/09:60-10:00/UTC"), "conditions[3].values[0]", "not a valid time of day"),
        (time_cond("M/25:00-26:00/UTC"), "conditions[3].values[0]", "not a valid time of day"),
        (time_cond("M/23:00-24:01/UTC"), "conditions[3].values[0]", "not a valid time of day"),
        (time_cond("M/24:00-24:00/UTC"), "conditions[3].values[0]", "24:00 can only end a range"),
        (time_cond("M/9am-5pm/UTC"), "conditions[3].values[0]", "is not a time"),
        (time_cond(7), "conditions[3].values[0]", "must be a string"),
        (time_cond("M/٠٩:٠٠-17:00/UTC"), "conditions[3].values[0]", "is not a time"),
    ],
)
def test_validate_condition_errors_name_the_field(given_: Any, field: str, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        validate_condition(given_, 3)
    assert info.value.field == field
    assert message in info.value.message


@pytest.mark.parametrize(
    ("value", "days"),
    [
        ("M,T,W,R,F/08:00-18:00/Europe/Berlin", "MTWRF"),
        ("MTWRF/08:00-18:00/Europe/Berlin", "MTWRF"),
        ("m-f/08:00-18:00/Europe/Berlin", "MTWRF"),
        ("Mon-Fri/08:00-18:00/Europe/Berlin", "MTWRF"),
        ("saturday,Sun/08:00-18:00/Europe/Berlin", "SU"),
        ("F-M/08:00-18:00/Europe/Berlin", "MFSU"),
        ("W,W/08:00-18:00/Europe/Berlin", "W"),
    ],
)
def test_day_sets_expand_to_one_value_per_day(value: str, days: str) -> None:
    assert validate_condition(time_cond(value)) == time_cond(
        *(f"{d}/08:00-18:00/Europe/Berlin" for d in days)
    )


def test_stored_day_set_is_evaluated_like_its_expansion() -> None:
    stored = time_cond("M,T,W,R,F/08:00-18:00/Europe/Berlin")
    expanded = validate_condition(stored)
    for hours in range(0, 24 * 7, 5):
        now = utc(2026, 6, 1) + timedelta(hours=hours)
        a = evaluate([pol("p", stored)], ctx(now))
        b = evaluate([pol("p", expanded)], ctx(now))
        assert (a.allowed, a.expires_at) == (b.allowed, b.expires_at)
    assert evaluate([pol("p", stored)], ctx(utc(2026, 6, 5, 15, 0))).expires_at == utc(
        2026, 6, 5, 16, 0
    )


def test_validate_condition_without_index_gives_relative_fields() -> None:
    with pytest.raises(ValidationError) as info:
        validate_condition(cond("remote_ip", "is_in_cidr", "nope"))
    assert info.value.field == "values[0]"
    with pytest.raises(ValidationError) as info:
        validate_condition(cond("remote_ip", "is_in", "10.0.0.0/8"))
    assert info.value.field == "operator"
    with pytest.raises(ValidationError) as info:
        validate_condition("remote_ip")
    assert info.value.field == "condition"


def test_validate_conditions() -> None:
    assert validate_conditions(None) == []
    assert validate_conditions([cond("client_verified", "is", "true")]) == [
        cond("client_verified", "is", "true")
    ]
    with pytest.raises(ValidationError) as info:
        validate_conditions([cond("client_verified", "is", "true"), cond("x", "is", "y")])
    assert info.value.field == "conditions[1].property"
    with pytest.raises(ValidationError) as info:
        validate_conditions("client_verified")
    assert info.value.field == "conditions"


# --------------------------------------------------------------------------------------------
# parse_condition_cli


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "remote_ip is_in_cidr 10.0.0.0/8,192.0.2.0/24",
            cond("remote_ip", "is_in_cidr", "10.0.0.0/8", "192.0.2.0/24"),
        ),
        (
            "remote_ip in 10.0.0.0/8, 192.0.2.7",
            cond("remote_ip", "is_in_cidr", "10.0.0.0/8", "192.0.2.7/32"),
        ),
        ("ip not_in 198.51.100.0/24", cond("remote_ip", "is_not_in_cidr", "198.51.100.0/24")),
        (
            "remote_ip not in 198.51.100.0/24",
            cond("remote_ip", "is_not_in_cidr", "198.51.100.0/24"),
        ),
        (
            "remote_ip not-in 198.51.100.0/24",
            cond("remote_ip", "is_not_in_cidr", "198.51.100.0/24"),
        ),
        ("provider_id is_not_in abc", cond("provider_id", "is_not_in", "abc")),
        ("provider in a, b,c", cond("provider_id", "is_in", "a", "b", "c")),
        ("provider not in Google Workspace", cond("provider_id", "is_not_in", "Google Workspace")),
        ("client_verified", cond("client_verified", "is", "true")),
        ("client_verified is true", cond("client_verified", "is", "true")),
        ("verified true", cond("client_verified", "is", "true")),
        (
            "current_utc_datetime is_in_day_of_week_time_ranges M/09:00-17:00/Europe/Berlin;T/true/UTC",
            time_cond("M/09:00-17:00/Europe/Berlin", "T/true/UTC"),
        ),
        (
            "time in M-F/9-17/Europe/Berlin",
            time_cond(*(f"{d}/09:00-17:00/Europe/Berlin" for d in "MTWRF")),
        ),
        ("time in Sat-Sun/true/UTC", time_cond("S/true/UTC", "U/true/UTC")),
        ("time in F-M/true/UTC", time_cond("M/true/UTC", "F/true/UTC", "S/true/UTC", "U/true/UTC")),
        (
            "time in MWF/08:00-12:00,13:00-17:00/UTC",
            time_cond(*(f"{d}/08:00-12:00,13:00-17:00/UTC" for d in "MWF")),
        ),
        (
            "time in M,W/true/UTC  R/10-11/UTC",
            time_cond("M/true/UTC", "W/true/UTC", "R/10:00-11:00/UTC"),
        ),
    ],
)
def test_parse_condition_cli(text: str, expected: dict[str, Any]) -> None:
    assert parse_condition_cli(text) == expected


@pytest.mark.parametrize(
    ("text", "field", "message"),
    [
        ("", "condition", "is empty"),
        ("country in DE", "condition", "unknown property 'country'"),
        ("remote_ip", "condition", "needs an operator and values"),
        (
            "remote_ip is 10.0.0.0/8",
            "condition",
            "unknown operator 'is' for remote_ip; use in or not_in",
        ),
        (
            "time not_in M/true/UTC",
            "condition",
            "unknown operator 'not_in' for current_utc_datetime; use in",
        ),
        ("remote_ip in", "condition", "needs at least one value"),
        ("remote_ip in 10.0.0.0/33", "condition.values[0]", "not an IP address or CIDR"),
        ("client_verified is false", "condition", "write 'client_verified'"),
        ("time in M-F", "condition", "must look like M-F/09:00-17:00/Europe/Berlin"),
        ("time in Q/true/UTC", "condition", "day 'Q' must be one of M T W R F S U"),
        ("time in M/true/Nowhere/City", "condition.values[0]", "unknown IANA time zone"),
    ],
)
def test_parse_condition_cli_errors(text: str, field: str, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_condition_cli(text)
    assert info.value.field == field
    assert message in info.value.message


# --------------------------------------------------------------------------------------------
# evaluate: structure


def test_no_policy_denies_without_violations() -> None:
    d = evaluate([], ctx())
    assert d == Decision(False, None, None, (), (), REASON_NO_POLICY)


def test_policy_without_conditions_allows_until_token_expiry() -> None:
    token = utc(2026, 6, 10)
    d = evaluate([pol("p1")], ctx(token=token))
    assert (d.allowed, d.policy_id, d.expires_at, d.reason) == (True, "p1", token, REASON_ALLOWED)
    assert d.per_policy == (("p1", ()),)
    assert evaluate([pol("p1")], ctx()).expires_at is None


def test_token_expiry_is_reported_in_utc() -> None:
    token = datetime(2026, 6, 10, 12, 0, tzinfo=BERLIN)
    d = evaluate([pol("p1")], ctx(token=token))
    assert d.expires_at == token
    assert d.expires_at is not None and d.expires_at.utcoffset() == timedelta(0)


def test_disabled_policy_never_allows() -> None:
    d = evaluate([pol("p1", disabled=True)], ctx())
    assert not d.allowed
    assert d.reason == REASON_DISABLED
    assert d.violated_properties == ()
    assert d.per_policy == (("p1", ("disabled",)),)


def test_policies_or_together_and_per_policy_lists_every_candidate() -> None:
    deny = pol("p1", cond("client_verified", "is", "true"))
    allow = pol("p2", cond("remote_ip", "is_in_cidr", "192.0.2.0/24"))
    off = pol("p3", disabled=True)
    d = evaluate([deny, off, allow], ctx())
    assert d.allowed and d.policy_id == "p2"
    assert d.violated_properties == ()
    assert d.per_policy == (("p1", ("client_verified",)), ("p3", ("disabled",)), ("p2", ()))


def test_all_conditions_of_one_policy_must_hold() -> None:
    p = pol(
        "p1",
        cond("remote_ip", "is_in_cidr", "192.0.2.0/24"),
        cond("provider_id", "is_in", "prov-b"),
        cond("client_verified", "is", "true"),
    )
    d = evaluate([p], ctx())
    assert not d.allowed
    assert d.reason == REASON_VIOLATED
    assert d.violated_properties == ("provider_id", "client_verified")
    assert evaluate([p], ctx(provider="prov-b", verified=True)).allowed


def test_violated_properties_are_the_union_in_first_seen_order() -> None:
    d = evaluate(
        [
            pol("p1", cond("client_verified", "is", "true"), cond("provider_id", "is_in", "x")),
            pol(
                "p2",
                cond("remote_ip", "is_in_cidr", "10.0.0.0/8"),
                cond("provider_id", "is_in", "y"),
            ),
            pol("p3", disabled=True),
        ],
        ctx(),
    )
    assert d.violated_properties == ("client_verified", "provider_id", "remote_ip")
    assert d.per_policy == (
        ("p1", ("client_verified", "provider_id")),
        ("p2", ("remote_ip", "provider_id")),
        ("p3", ("disabled",)),
    )


def test_same_property_twice_is_reported_once() -> None:
    p = pol(
        "p1",
        cond("remote_ip", "is_in_cidr", "10.0.0.0/8"),
        cond("remote_ip", "is_not_in_cidr", "192.0.2.0/24"),
    )
    assert evaluate([p], ctx()).violated_properties == ("remote_ip",)
    assert [c.ok for c in evaluate_policy(p, ctx()).conditions] == [False, False]


def test_naive_now_is_rejected() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        evaluate([pol("p1")], EvalContext(now=datetime(2026, 1, 1)))
    with pytest.raises(ValueError, match="timezone-aware"):
        evaluate([pol("p1")], ctx(token=datetime(2026, 1, 2)))


def test_accepts_policies_from_a_generator() -> None:
    assert evaluate((p for p in [pol("p1")]), ctx()).allowed


# --------------------------------------------------------------------------------------------
# remote_ip


@pytest.mark.parametrize(
    ("op", "values", "ip", "ok"),
    [
        ("is_in_cidr", ["192.0.2.0/24"], "192.0.2.10", True),
        ("is_in_cidr", ["192.0.2.0/24"], "192.0.3.10", False),
        ("is_in_cidr", ["192.0.2.0/25"], "192.0.2.127", True),
        ("is_in_cidr", ["192.0.2.0/25"], "192.0.2.128", False),
        ("is_in_cidr", ["10.0.0.0/8", "192.0.2.10"], "192.0.2.10", True),
        ("is_in_cidr", ["10.0.0.0/8", "192.0.2.10"], "192.0.2.11", False),
        ("is_in_cidr", ["2001:db8::/32"], "2001:db8:1::5", True),
        ("is_in_cidr", ["2001:db8::/32"], "2001:db9::5", False),
        ("is_in_cidr", ["0.0.0.0/0"], "2001:db8::1", False),  # families never mix
        ("is_in_cidr", ["::/0"], "2001:db8::1", True),
        ("is_in_cidr", ["192.0.2.0/24"], "::ffff:192.0.2.10", True),  # v4-mapped socket address
        ("is_in_cidr", ["fe80::/10"], "fe80::1%eth0", True),
        ("is_not_in_cidr", ["192.0.2.0/24"], "192.0.2.10", False),
        ("is_not_in_cidr", ["192.0.2.0/24"], "198.51.100.1", True),
        ("is_not_in_cidr", ["10.0.0.0/8", "172.16.0.0/12"], "172.31.255.255", False),
        ("is_not_in_cidr", ["10.0.0.0/8", "172.16.0.0/12"], "172.32.0.0", True),
        # unknown or garbage remote IP fails closed for both operators
        ("is_in_cidr", ["0.0.0.0/0"], None, False),
        ("is_not_in_cidr", ["192.0.2.0/24"], None, False),
        ("is_not_in_cidr", ["192.0.2.0/24"], "not-an-ip", False),
    ],
)
def test_remote_ip(op: str, values: list[str], ip: str | None, ok: bool) -> None:
    d = evaluate([pol("p", cond("remote_ip", op, *values))], ctx(ip=ip))
    assert d.allowed is ok
    assert d.violated_properties == (() if ok else ("remote_ip",))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(8, 32)), min_size=1, max_size=6),
    st.integers(0, 2**32 - 1),
)
def test_remote_ip_agrees_with_ipaddress(nets: list[tuple[int, int]], ip_int: int) -> None:
    import ipaddress

    networks = [ipaddress.ip_network((n, plen), strict=False) for n, plen in nets]
    ip = ipaddress.ip_address(ip_int)
    expected = any(ip in n for n in networks)
    values = [str(n) for n in networks]
    assert (
        evaluate([pol("p", cond("remote_ip", "is_in_cidr", *values))], ctx(ip=str(ip))).allowed
        is expected
    )
    assert (
        evaluate([pol("p", cond("remote_ip", "is_not_in_cidr", *values))], ctx(ip=str(ip))).allowed
        is not expected
    )


# --------------------------------------------------------------------------------------------
# provider_id and client_verified


@pytest.mark.parametrize(
    ("op", "provider", "ok"),
    [
        ("is_in", "prov-a", True),
        ("is_in", "prov-c", False),
        ("is_not_in", "prov-a", False),
        ("is_not_in", "prov-c", True),
        ("is_in", None, False),
        ("is_not_in", None, False),  # unknown provider fails closed
    ],
)
def test_provider_id(op: str, provider: str | None, ok: bool) -> None:
    c = cond("provider_id", op, "prov-a", "prov-b")
    d = evaluate([pol("p", c)], ctx(provider=provider))
    assert d.allowed is ok
    assert d.violated_properties == (() if ok else ("provider_id",))


def test_auth_provider_id_spelling_is_reported_as_provider_id() -> None:
    d = evaluate([pol("p", cond("auth_provider_id", "is_in", "x"))], ctx())
    assert d.violated_properties == ("provider_id",)


@pytest.mark.parametrize(("verified", "ok"), [(True, True), (False, False)])
def test_client_verified(verified: bool, ok: bool) -> None:
    d = evaluate([pol("p", cond("client_verified", "is", "true"))], ctx(verified=verified))
    assert d.allowed is ok
    assert d.violated_properties == (() if ok else ("client_verified",))


def test_invalid_stored_condition_fails_closed() -> None:
    bad = [
        cond("remote_ip", "is_in_cidr", "not-a-network"),
        cond("country", "is_in", "DE"),
        {"property": "client_verified", "operator": "is", "values": [["unhashable"]]},
        {"property": "provider_id", "operator": "is_in", "values": {"a": 1}},
        "garbage",
    ]
    for c in bad:
        r = evaluate_policy(pol("p", c), ctx(verified=True))  # type: ignore[arg-type]
        assert not r.allowed, c
        assert r.conditions[0].ok is False
        assert "invalid condition" in r.conditions[0].reason
    d = evaluate([pol("p", cond("country", "is_in", "DE"))], ctx())
    assert d.violated_properties == ("country",)


# --------------------------------------------------------------------------------------------
# time windows: basics (2026-06-01 is a Monday; Berlin is UTC+2 in summer)


def test_inside_a_window_allows_until_its_end() -> None:
    c = time_cond("W/09:00-17:00/Europe/Berlin")
    d = evaluate([pol("p", c)], ctx(utc(2026, 6, 3, 12, 0)))
    assert d.allowed
    assert d.expires_at == utc(2026, 6, 3, 15, 0)  # 17:00 CEST


@pytest.mark.parametrize(
    ("now", "ok"),
    [
        (utc(2026, 6, 3, 6, 59, 59), False),
        (utc(2026, 6, 3, 7, 0, 0), True),  # 09:00 CEST: the start is inclusive
        (utc(2026, 6, 3, 14, 59, 59), True),
        (utc(2026, 6, 3, 15, 0, 0), False),  # 17:00 CEST: the end is exclusive
        (utc(2026, 6, 2, 12, 0), False),  # Tuesday
        (utc(2026, 6, 4, 12, 0), False),  # Thursday
    ],
)
def test_window_edges(now: datetime, ok: bool) -> None:
    d = evaluate([pol("p", time_cond("W/09:00-17:00/Europe/Berlin"))], ctx(now))
    assert d.allowed is ok
    assert d.violated_properties == (() if ok else ("current_utc_datetime",))


def test_weekday_is_taken_in_the_windows_zone() -> None:
    # Monday 23:30 UTC is already Tuesday 01:30 in Berlin.
    now = utc(2026, 6, 1, 23, 30)
    assert evaluate([pol("p", time_cond("T/00:00-02:00/Europe/Berlin"))], ctx(now)).allowed
    assert not evaluate([pol("p", time_cond("M/true/Europe/Berlin"))], ctx(now)).allowed
    assert evaluate([pol("p", time_cond("M/true/UTC"))], ctx(now)).allowed


def test_fractional_now_is_floored_to_the_second() -> None:
    now = utc(2026, 6, 3, 14, 59, 59) + timedelta(microseconds=999_999)
    d = evaluate([pol("p", time_cond("W/09:00-17:00/Europe/Berlin"))], ctx(now))
    assert d.allowed and d.expires_at == utc(2026, 6, 3, 15, 0)


def test_windows_touching_across_midnight_form_one_window() -> None:
    c = time_cond("W/20:00-24:00/UTC", "R/00:00-06:00/UTC")
    d = evaluate([pol("p", c)], ctx(utc(2026, 6, 3, 22, 0)))
    assert d.expires_at == utc(2026, 6, 4, 6, 0)


def test_whole_days_chain_and_sunday_wraps_into_monday() -> None:
    c = time_cond("S/true/UTC", "U/true/UTC", "M/00:00-08:00/UTC")
    d = evaluate([pol("p", c)], ctx(utc(2026, 6, 6, 10, 0)))  # Saturday
    assert d.expires_at == utc(2026, 6, 8, 8, 0)


def test_window_covering_the_whole_week_never_expires() -> None:
    c = time_cond(*(f"{d}/true/Europe/Berlin" for d in "MTWRFSU"))
    assert evaluate([pol("p", c)], ctx()).expires_at is None
    token = utc(2026, 6, 4)
    assert evaluate([pol("p", c)], ctx(token=token)).expires_at == token


def test_token_expiry_caps_the_window_end() -> None:
    c = time_cond("W/09:00-17:00/UTC")
    assert evaluate([pol("p", c)], ctx(token=utc(2026, 6, 3, 13, 0))).expires_at == utc(
        2026, 6, 3, 13, 0
    )
    assert evaluate([pol("p", c)], ctx(token=utc(2026, 6, 3, 18, 0))).expires_at == utc(
        2026, 6, 3, 17, 0
    )


def test_values_in_different_zones_or_together() -> None:
    # Wednesday 12:00 UTC: outside W/09-13 New York (08:00 EDT), inside W/13-15 Berlin (14:00 CEST)
    c = time_cond("W/09:00-13:00/America/New_York", "W/13:00-15:00/Europe/Berlin")
    d = evaluate([pol("p", c)], ctx(utc(2026, 6, 3, 12, 0)))
    assert d.allowed
    # Berlin ends 13:00 UTC, New York started 13:00 UTC and runs to 17:00 UTC: one long window.
    assert d.expires_at == utc(2026, 6, 3, 17, 0)


def test_overlapping_windows_in_different_zones_use_the_union() -> None:
    c = time_cond("W/10:00-12:00/UTC", "W/13:00-15:00/Europe/Berlin", "W/12:30-14:00/UTC")
    # 11:00-13:00 UTC via Berlin bridges 10:00-12:00 and 12:30-14:00 UTC.
    d = evaluate([pol("p", c)], ctx(utc(2026, 6, 3, 10, 30)))
    assert d.expires_at == utc(2026, 6, 3, 14, 0)
    # without the bridge there is a gap at 13:00-13:30 UTC
    c = time_cond("W/10:00-12:00/UTC", "W/13:00-15:00/Europe/Berlin", "W/13:30-14:00/UTC")
    assert evaluate([pol("p", c)], ctx(utc(2026, 6, 3, 10, 30))).expires_at == utc(
        2026, 6, 3, 13, 0
    )


def test_longest_lived_allowing_policy_wins() -> None:
    short = pol("short", time_cond("W/09:00-13:00/UTC"))
    long_ = pol("long", time_cond("W/09:00-18:00/UTC"))
    unlimited = pol("unlimited")
    d = evaluate([short, long_], ctx(utc(2026, 6, 3, 12, 0)))
    assert (d.policy_id, d.expires_at) == ("long", utc(2026, 6, 3, 18, 0))
    d = evaluate([short, unlimited, long_], ctx(utc(2026, 6, 3, 12, 0)))
    assert (d.policy_id, d.expires_at) == ("unlimited", None)
    # with a token, the unlimited policy ties with nothing longer; the first with the latest wins
    token = utc(2026, 6, 3, 17, 0)
    d = evaluate([short, long_, unlimited], ctx(utc(2026, 6, 3, 12, 0), token=token))
    assert (d.policy_id, d.expires_at) == ("long", token)


def test_condition_result_carries_window_end() -> None:
    r = evaluate_policy(pol("p", time_cond("W/09:00-17:00/UTC")), ctx(utc(2026, 6, 3, 12, 0)))
    assert r.conditions[0].ok and r.conditions[0].expires_at == utc(2026, 6, 3, 17, 0)


# --------------------------------------------------------------------------------------------
# time windows across DST changes
# Europe/Berlin 2026: spring forward Sun 29 Mar 01:00 UTC (02:00 CET -> 03:00 CEST),
#                     fall back Sun 25 Oct 01:00 UTC (03:00 CEST -> 02:00 CET).
# America/New_York 2026: spring forward Sun 8 Mar 07:00 UTC (02:00 EST -> 03:00 EDT),
#                        fall back Sun 1 Nov 06:00 UTC (02:00 EDT -> 01:00 EST).


def _decide(value: str, now: datetime) -> Decision:
    return evaluate([pol("p", time_cond(value))], ctx(now))


def test_berlin_spring_forward_window_over_the_gap_lasts_one_real_hour() -> None:
    value = "U/01:00-03:00/Europe/Berlin"
    assert not _decide(value, utc(2026, 3, 28, 23, 59)).allowed
    d = _decide(value, utc(2026, 3, 29, 0, 0))  # 01:00 CET
    assert d.allowed and d.expires_at == utc(2026, 3, 29, 1, 0)  # 03:00 CEST
    assert not _decide(value, utc(2026, 3, 29, 1, 0)).allowed


def test_berlin_spring_forward_window_ending_inside_the_gap_ends_at_the_jump() -> None:
    d = _decide("U/01:00-02:30/Europe/Berlin", utc(2026, 3, 29, 0, 30))
    assert d.allowed and d.expires_at == utc(2026, 3, 29, 1, 0)
    assert not _decide("U/01:00-02:30/Europe/Berlin", utc(2026, 3, 29, 1, 0)).allowed


def test_berlin_spring_forward_window_inside_the_gap_never_holds() -> None:
    for minute in range(0, 24 * 60, 15):
        now = utc(2026, 3, 28, 12, 0) + timedelta(minutes=minute)
        assert not _decide("U/02:00-03:00/Europe/Berlin", now).allowed


def test_berlin_spring_forward_window_starting_in_the_gap_starts_at_the_jump() -> None:
    value = "U/02:30-04:00/Europe/Berlin"
    assert not _decide(value, utc(2026, 3, 29, 0, 59, 59)).allowed
    d = _decide(value, utc(2026, 3, 29, 1, 0))  # 03:00 CEST
    assert d.allowed and d.expires_at == utc(2026, 3, 29, 2, 0)  # 04:00 CEST


def test_berlin_fall_back_window_over_the_repeated_hour_lasts_three_real_hours() -> None:
    value = "U/01:00-03:00/Europe/Berlin"
    d = _decide(value, utc(2026, 10, 24, 23, 0))  # 01:00 CEST
    assert d.allowed and d.expires_at == utc(2026, 10, 25, 2, 0)  # 03:00 CET
    d = _decide(value, utc(2026, 10, 25, 1, 30))  # 02:30 CET, second time round
    assert d.allowed and d.expires_at == utc(2026, 10, 25, 2, 0)
    assert not _decide(value, utc(2026, 10, 25, 2, 0)).allowed


def test_berlin_fall_back_window_ending_in_the_repeated_hour_holds_twice() -> None:
    value = "U/01:00-02:30/Europe/Berlin"
    d = _decide(value, utc(2026, 10, 24, 23, 30))  # 01:30 CEST
    assert d.expires_at == utc(2026, 10, 25, 0, 30)  # first 02:30 (CEST)
    assert not _decide(value, utc(2026, 10, 25, 0, 30)).allowed  # 02:30 CEST
    assert not _decide(value, utc(2026, 10, 25, 0, 59)).allowed  # 02:59 CEST
    d = _decide(value, utc(2026, 10, 25, 1, 0))  # 02:00 CET: inside again
    assert d.allowed and d.expires_at == utc(2026, 10, 25, 1, 30)  # second 02:30 (CET)


def test_berlin_fall_back_window_starting_in_the_repeated_hour_is_left_at_the_jump_back() -> None:
    value = "U/02:30-04:00/Europe/Berlin"
    d = _decide(value, utc(2026, 10, 25, 0, 45))  # 02:45 CEST
    # at 01:00 UTC clocks go back to 02:00 CET, which is before 02:30: out until 02:30 CET
    assert d.allowed and d.expires_at == utc(2026, 10, 25, 1, 0)
    assert not _decide(value, utc(2026, 10, 25, 1, 0)).allowed
    d = _decide(value, utc(2026, 10, 25, 1, 30))  # 02:30 CET
    assert d.allowed and d.expires_at == utc(2026, 10, 25, 3, 0)  # 04:00 CET


def test_berlin_window_ending_exactly_at_the_jump_back_continues() -> None:
    # 02:00-03:00: at 03:00 CEST (01:00 UTC) the clock shows 02:00 CET, still inside.
    d = _decide("U/02:00-03:00/Europe/Berlin", utc(2026, 10, 25, 0, 0))
    assert d.expires_at == utc(2026, 10, 25, 2, 0)


def test_new_york_spring_forward() -> None:
    value = "U/01:00-03:00/America/New_York"
    d = _decide(value, utc(2026, 3, 8, 6, 0))  # 01:00 EST
    assert d.allowed and d.expires_at == utc(2026, 3, 8, 7, 0)  # the jump to 03:00 EDT
    d = _decide("U/true/America/New_York", utc(2026, 3, 8, 12, 0))
    assert d.expires_at == utc(2026, 3, 9, 4, 0)  # the Sunday has 23 hours; ends 00:00 EDT


def test_new_york_fall_back() -> None:
    value = "U/01:00-02:00/America/New_York"
    d = _decide(value, utc(2026, 11, 1, 5, 0))  # 01:00 EDT
    # 01:00-02:00 happens twice back to back: the window lasts two real hours
    assert d.allowed and d.expires_at == utc(2026, 11, 1, 7, 0)  # 02:00 EST
    d = _decide("U/true/America/New_York", utc(2026, 11, 1, 12, 0))
    assert d.expires_at == utc(2026, 11, 2, 5, 0)  # the Sunday has 25 hours


def test_new_york_spring_forward_window_starting_in_the_gap() -> None:
    value = "U/02:30-04:00/America/New_York"
    assert not _decide(value, utc(2026, 3, 8, 6, 59)).allowed  # 01:59 EST
    d = _decide(value, utc(2026, 3, 8, 7, 0))  # 03:00 EDT
    assert d.allowed and d.expires_at == utc(2026, 3, 8, 8, 0)  # 04:00 EDT


def test_lord_howe_half_hour_fall_back() -> None:
    # 2026-04-05 02:00 +11:00 (15:00 UTC) becomes 01:30 +10:30: 01:30-02:00 happens twice.
    value = "U/01:00-02:00/Australia/Lord_Howe"
    d = _decide(value, utc(2026, 4, 4, 14, 0))  # 01:00 +11:00
    assert d.allowed and d.expires_at == utc(2026, 4, 4, 15, 30)  # 02:00 +10:30
    d = _decide("U/01:45-03:00/Australia/Lord_Howe", utc(2026, 4, 4, 14, 50))  # 01:50 +11:00
    # at 15:00 UTC the clock shows 01:30, before 01:45: out until 01:45 +10:30
    assert d.allowed and d.expires_at == utc(2026, 4, 4, 15, 0)
    assert not _decide("U/01:45-03:00/Australia/Lord_Howe", utc(2026, 4, 4, 15, 0)).allowed
    d = _decide("U/01:45-03:00/Australia/Lord_Howe", utc(2026, 4, 4, 15, 15))
    assert d.allowed and d.expires_at == utc(2026, 4, 4, 16, 30)


def test_business_hours_across_a_dst_change_use_local_time() -> None:
    c = "M/09:00-17:00/America/New_York"
    assert _decide(c, utc(2026, 3, 2, 14, 0)).allowed  # 09:00 EST
    assert not _decide(c, utc(2026, 3, 9, 12, 30)).allowed  # 08:30 EDT
    d = _decide(c, utc(2026, 3, 9, 13, 0))  # 09:00 EDT
    assert d.allowed and d.expires_at == utc(2026, 3, 9, 21, 0)


def test_zone_offsets_find_the_transitions_to_the_second() -> None:
    zo = policies._zone_offsets("Europe/Berlin")
    spring = int(utc(2026, 3, 29, 1, 0).timestamp())
    autumn = int(utc(2026, 10, 25, 1, 0).timestamp())
    assert zo.offset(spring - 1) == 3600 and zo.offset(spring) == 7200
    assert zo.offset(autumn - 1) == 7200 and zo.offset(autumn) == 3600
    start = int(utc(2026, 1, 1).timestamp())
    assert zo.next_transition(start, start + 400 * 86400) == spring
    assert zo.next_transition(spring, start + 400 * 86400) == autumn
    assert zo.next_transition(spring, autumn - 1) is None
    # the next year's first transition is found across the year boundary
    assert zo.next_transition(autumn, autumn + 200 * 86400) == int(
        utc(2027, 3, 28, 1, 0).timestamp()
    )
    utc_zone = policies._zone_offsets("UTC")
    assert utc_zone.next_transition(start, start + 800 * 86400) is None


# --------------------------------------------------------------------------------------------
# time windows vs a brute-force oracle (minute by minute, straight from zoneinfo)

_ZONES = [
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe",  # 30-minute DST shift
    "Asia/Kolkata",  # +05:30, no DST
    "America/St_Johns",  # -03:30 / -02:30
    "Pacific/Chatham",  # +12:45 / +13:45
    "Australia/Sydney",  # southern hemisphere
]
_TRANSITION_DAYS = [
    utc(2026, 3, 29),
    utc(2026, 10, 25),
    utc(2026, 3, 8),
    utc(2026, 11, 1),
    utc(2026, 4, 5),
    utc(2026, 10, 4),
    utc(2026, 9, 27),
    utc(2026, 4, 4),
]


def _oracle_holds(values: list[tuple[int, list[tuple[int, int]], str]], t: datetime) -> bool:
    for day, ranges, tz in values:
        local = t.astimezone(ZoneInfo(tz))
        secs = local.hour * 3600 + local.minute * 60 + local.second
        if local.weekday() == day and any(s <= secs < e for s, e in ranges):
            return True
    return False


@st.composite
def _windows(draw: st.DrawFn) -> list[tuple[int, list[tuple[int, int]], str]]:
    zones = draw(st.lists(st.sampled_from(_ZONES), min_size=1, max_size=2, unique=True))
    out = []
    for _ in range(draw(st.integers(1, 5))):
        day = draw(st.integers(0, 6))
        tz = draw(st.sampled_from(zones))
        if draw(st.integers(0, 4)) == 0:
            ranges = [(0, 86400)]
        else:
            ranges = []
            for _ in range(draw(st.integers(1, 3))):
                a = draw(st.integers(0, 1439)) * 60
                b = draw(st.integers(a // 60 + 1, 1440)) * 60
                ranges.append((a, b))
        out.append((day, ranges, tz))
    return out


def _fmt(sec: int) -> str:
    return f"{sec // 3600:02d}:{sec % 3600 // 60:02d}"


@st.composite
def _window_and_now(
    draw: st.DrawFn,
) -> tuple[list[tuple[int, list[tuple[int, int]], str]], datetime]:
    values = draw(_windows())
    day = draw(st.sampled_from(_TRANSITION_DAYS))
    if draw(st.booleans()):
        now = day + timedelta(minutes=draw(st.integers(-2 * 24 * 60, 2 * 24 * 60)))
    else:
        # aim inside (or at the edge of) one of the windows, in its own zone's wall clock
        wday, ranges, tz = draw(st.sampled_from(values))
        start, end = draw(st.sampled_from(ranges))
        sec = draw(
            st.sampled_from([start, end, (start + end) // 2 // 60 * 60, max(start, end - 60)])
        )
        date = (
            day + timedelta(days=(wday - day.weekday()) % 7 - 7 * draw(st.integers(0, 1)))
        ).date()
        local = datetime(
            date.year, date.month, date.day, tzinfo=ZoneInfo(tz), fold=draw(st.integers(0, 1))
        )
        now = (local + timedelta(seconds=sec)).astimezone(UTC)
        now = now.replace(second=0, microsecond=0)
    return values, now


@settings(max_examples=600, deadline=None)
@given(_window_and_now())
def test_time_windows_agree_with_minute_by_minute_oracle(
    case: tuple[list[tuple[int, list[tuple[int, int]], str]], datetime],
) -> None:
    values, now = case
    horizon = now + timedelta(days=8)
    texts = [
        f"{'MTWRFSU'[d]}/{','.join(f'{_fmt(s)}-{_fmt(e)}' for s, e in ranges)}/{tz}"
        for d, ranges, tz in values
    ]
    d = evaluate([pol("p", time_cond(*texts))], ctx(now, token=horizon))
    expected_now = _oracle_holds(values, now)
    assert d.allowed is expected_now, (texts, now)
    event(f"holds={expected_now}")
    if not expected_now:
        assert d.violated_properties == ("current_utc_datetime",)
        return
    t = now
    while t < horizon and _oracle_holds(values, t):
        t += timedelta(minutes=1)
    assert d.expires_at == min(t, horizon), (texts, now)


# --------------------------------------------------------------------------------------------
# explain


def test_explain_lines() -> None:
    p1 = pol(
        "p1", cond("remote_ip", "is_in_cidr", "10.0.0.0/8"), cond("client_verified", "is", "true")
    )
    p2 = pol("p2", disabled=True)
    lines = explain_lines(evaluate([p1, p2], ctx(verified=True)))
    assert lines[0] == "denied: conditions not met"
    assert lines[1] == "  policy p1: denies (remote_ip)"
    assert lines[2].startswith("    [0] remote_ip is_in_cidr FAILED: 192.0.2.10 is not in")
    assert lines[3] == "    [1] client_verified is ok"
    assert lines[4] == "  policy p2: disabled"
    lines = explain_lines(evaluate([pol("p3", time_cond("W/true/UTC"))], ctx()))
    assert lines[0] == "allowed by policy p3 until 2026-06-04T00:00:00+00:00"
    assert lines[2].endswith("ok: until 2026-06-04T00:00:00+00:00")
    assert explain_lines(evaluate([], ctx())) == ["denied: no policy"]


# --------------------------------------------------------------------------------------------
# whole decisions vs a reference model (OR of ANDs, longest-lived wins), all conditions mixed

_REF_NETS = ["192.0.2.0/24", "198.51.100.0/25", "2001:db8::/32", "10.0.0.0/8"]
_REF_TIME_VALUES = [
    "M/09:00-17:00/Europe/Berlin",
    "W/08:15-12:45,13:00-18:00/Europe/Berlin",
    "U/01:00-03:00/Europe/Berlin",
    "S/true/UTC",
    "U/00:00-02:30/UTC",
    "F/22:00-24:00/America/New_York",
    "S/00:00-04:00/America/New_York",
    "U/01:00-02:00/America/New_York",
    "R/true/America/New_York",
]
_REF_NOWS = [
    utc(2026, 3, 29, 0, 30),  # Berlin spring-forward night
    utc(2026, 10, 25, 0, 45),  # Berlin fall-back night
    utc(2026, 11, 1, 5, 30),  # New York fall-back night
    utc(2026, 6, 1, 8, 0),  # a Monday morning
    utc(2026, 6, 3, 10, 15),  # a Wednesday
    utc(2026, 6, 6, 3, 0),  # a Saturday
]


@st.composite
def _ref_condition(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["remote_ip", "provider_id", "client_verified", *["time"] * 4]))
    if kind == "remote_ip":
        op = draw(st.sampled_from(["is_in_cidr", "is_not_in_cidr"]))
        nets = draw(st.lists(st.sampled_from(_REF_NETS), min_size=1, max_size=3, unique=True))
        return cond("remote_ip", op, *nets)
    if kind == "provider_id":
        op = draw(st.sampled_from(["is_in", "is_not_in"]))
        ids = draw(st.lists(st.sampled_from(["a", "c"]), min_size=1, max_size=2, unique=True))
        return cond("provider_id", op, *ids)
    if kind == "client_verified":
        return cond("client_verified", "is", "true")
    vals = draw(st.lists(st.sampled_from(_REF_TIME_VALUES), min_size=1, max_size=3, unique=True))
    return time_cond(*vals)


def _ref_time_holds(values: list[str], t: datetime) -> bool:
    parsed = []
    for v in values:
        day, ranges, tz = v.split("/", 2)
        if ranges == "true":
            rs = [(0, 86400)]
        else:
            rs = []
            for piece in ranges.split(","):
                a, b = piece.split("-")
                ha, ma = map(int, a.split(":"))
                hb, mb = map(int, b.split(":"))
                rs.append((ha * 3600 + ma * 60, hb * 3600 + mb * 60))
        parsed.append(("MTWRFSU".index(day), rs, tz))
    return _oracle_holds(parsed, t)


def _ref_condition_ok(c: dict[str, Any], x: EvalContext) -> bool:
    import ipaddress

    prop, op, values = c["property"], c["operator"], c["values"]
    if prop == "remote_ip":
        if x.remote_ip is None:
            return False
        ip = ipaddress.ip_address(x.remote_ip)
        inside = any(ip in ipaddress.ip_network(v) for v in values)
        return inside if op == "is_in_cidr" else not inside
    if prop == "provider_id":
        if x.provider_id is None:
            return False
        return (x.provider_id in values) == (op == "is_in")
    if prop == "client_verified":
        return x.client_verified
    return _ref_time_holds(values, x.now)


def _ref_expiry(conds: list[dict[str, Any]], x: EvalContext) -> datetime | None:
    # Every boundary in these windows and zones sits on a quarter hour, and none of the value
    # combinations covers a whole week, so stepping by 15 minutes finds the exact exit.
    end: datetime | None = x.token_expires_at
    for c in conds:
        if c["property"] != "current_utc_datetime":
            continue
        t = x.now
        while _ref_time_holds(c["values"], t):
            t += timedelta(minutes=15)
        end = t if end is None else min(end, t)
    return end


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.lists(_ref_condition(), max_size=3), max_size=4),
    st.lists(st.integers(0, 5), min_size=4, max_size=4),
    st.sampled_from(_REF_NOWS),
    st.sampled_from(["192.0.2.10", "198.51.100.200", "2001:db8::1", "203.0.113.1", None]),
    st.sampled_from(["a", "b", None]),
    st.booleans(),
    st.sampled_from([None, timedelta(minutes=45), timedelta(days=3)]),
)
def test_decisions_agree_with_reference_model(
    specs: list[list[dict[str, Any]]],
    dice: list[int],
    now: datetime,
    ip: str | None,
    provider: str | None,
    verified: bool,
    token_in: timedelta | None,
) -> None:
    token = now + token_in if token_in else None
    x = ctx(now, ip=ip, provider=provider, verified=verified, token=token)
    # one policy in six is disabled
    pols = [pol(f"p{i}", *conds, disabled=dice[i] == 0) for i, conds in enumerate(specs)]
    d = evaluate(pols, x)

    expected_per_policy: list[tuple[str, tuple[str, ...]]] = []
    allowing: list[tuple[str, datetime | None]] = []
    violated_union: list[str] = []
    for p in pols:
        if p.disabled:
            expected_per_policy.append((p.id, ("disabled",)))
            continue
        violated: list[str] = []
        for c in p.conditions:
            prop = c["property"]
            if not _ref_condition_ok(dict(c), x) and prop not in violated:
                violated.append(prop)
        expected_per_policy.append((p.id, tuple(violated)))
        for v in violated:
            if v not in violated_union:
                violated_union.append(v)
        if not violated:
            allowing.append((p.id, _ref_expiry([dict(c) for c in p.conditions], x)))

    assert d.per_policy == tuple(expected_per_policy)
    if allowing:
        far = datetime.max.replace(tzinfo=UTC)
        best_exp = max((e or far) for _, e in allowing)
        best_id = next(pid for pid, e in allowing if (e or far) == best_exp)
        assert d.allowed
        assert (d.policy_id, d.expires_at) == (best_id, None if best_exp == far else best_exp)
        assert d.violated_properties == ()
        event(f"allowed, expiry from {'window' if d.expires_at not in (None, token) else 'token'}")
    else:
        event("denied")
        assert not d.allowed
        assert d.violated_properties == tuple(violated_union)
        assert d.expires_at is None and d.policy_id is None
        if not pols:
            assert d.reason == REASON_NO_POLICY
        elif all(p.disabled for p in pols):
            assert d.reason == REASON_DISABLED
        else:
            assert d.reason == REASON_VIOLATED


# --------------------------------------------------------------------------------------------
# robustness: garbage in, ValidationError (or a failed condition) out, never anything else

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def _garbage_condition(draw: st.DrawFn) -> Any:
    if draw(st.booleans()):
        return draw(_json)
    return {
        "property": draw(st.sampled_from([*policies.OPERATORS, "auth_provider_id", "x", 1])),
        "operator": draw(
            st.sampled_from(
                [
                    "is_in_cidr",
                    "is_not_in_cidr",
                    "is_in",
                    "is_not_in",
                    "is",
                    "is_in_day_of_week_time_ranges",
                    None,
                ]
            )
        ),
        "values": draw(
            st.lists(
                st.sampled_from(["10.0.0.0/8", "true", "M/true/UTC", "M/9-17/Nowhere", "", "x"])
                | _json,
                max_size=3,
            )
            | _json
        ),
    }


@settings(max_examples=500, deadline=None)
@given(_garbage_condition())
def test_validate_condition_raises_only_validation_error(c: Any) -> None:
    try:
        out = validate_condition(c, 0)
    except ValidationError as e:
        assert e.field.startswith("conditions[0]")
        return
    assert validate_condition(out) == out


@settings(max_examples=500, deadline=None)
@given(st.lists(_garbage_condition(), max_size=3), st.booleans())
def test_evaluate_never_raises_on_stored_garbage(conds: list[Any], verified: bool) -> None:
    d = evaluate([PolicyInput("p", "g", "r", tuple(conds))], ctx(verified=verified))
    valid = True
    for c in conds:
        try:
            validate_condition(c)
        except ValidationError:
            valid = False
    if not valid:
        assert not d.allowed


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=60))
def test_parse_condition_cli_raises_only_validation_error(text: str) -> None:
    try:
        parse_condition_cli(text)
    except ValidationError:
        pass


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["remote_ip", "ip", "provider", "time", "client_verified", "verified"]),
    st.sampled_from(["in", "not_in", "not in", "is", "is_in_cidr", ""]),
    st.lists(
        st.sampled_from(
            [
                "10.0.0.0/8",
                "192.0.2.1",
                "p1",
                "M-F/9-17/UTC",
                "S/true/Europe/Berlin",
                "true",
                "x/y",
                ",",
                ";",
            ]
        ),
        max_size=3,
    ),
)
def test_parse_condition_cli_output_is_valid(prop: str, op: str, values: list[str]) -> None:
    text = " ".join([prop, op, ",".join(values)])
    try:
        c = parse_condition_cli(text)
    except ValidationError:
        return
    assert validate_condition(c) == c


@settings(max_examples=1000, deadline=None)
@given(
    st.text(alphabet="MTWRFSUmx-,/:0123456789 truePAZ_", max_size=30)
    | st.builds(
        lambda d, r, tz: f"{d}/{r}/{tz}",
        st.text(alphabet="MTWRFSUx-,", max_size=4),
        st.text(alphabet="0123456789:-,true", max_size=14),
        st.sampled_from(["UTC", "Europe/Berlin", "Etc/GMT+5", "", "Nope/Zone", "../x"])
        | st.text(max_size=12),
    )
)
def test_time_values_raise_only_validation_error(value: str) -> None:
    try:
        out = validate_condition(time_cond(value), 0)
    except ValidationError as e:
        assert e.field in ("conditions[0].values[0]", "conditions[0].values")
        return
    assert validate_condition(out) == out
    evaluate([pol("p", out)], ctx())


def test_far_future_token_expiry_is_fast_and_kept() -> None:
    import time

    never = datetime.max.replace(tzinfo=UTC)
    always = time_cond(*(f"{d}/true/Europe/Berlin" for d in "MTWRFSU"))
    weekdays = time_cond("M-F/true/Europe/Berlin")
    t0 = time.perf_counter()
    assert evaluate([pol("p", always)], ctx(token=never)).expires_at == never
    d = evaluate([pol("p", weekdays)], ctx(token=never))
    # two zones with the same offset that together cover the week: never ends either
    split = time_cond("M-W/true/UTC", "R-U/true/Etc/GMT")
    assert evaluate([pol("p", split)], ctx(token=never)).expires_at == never
    assert evaluate([pol("p", split)], ctx()).expires_at is None
    assert time.perf_counter() - t0 < 1.0
    assert d.expires_at == utc(2026, 6, 5, 22, 0)  # Saturday 00:00 CEST
