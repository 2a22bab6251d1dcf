"""DURATION, --at and --filter parsing of the admin CLI, and conditions shown in its syntax."""

from __future__ import annotations

import pytest

from firezone.cli.admin import MAX_DURATION, condition_text, parse_at, parse_duration, parse_filters


@pytest.mark.parametrize(("text", "seconds"), [
    ("1", 1),
    ("3600", 3600),
    ("45s", 45),
    ("30m", 1800),
    ("12h", 43200),
    ("7d", 604800),
    ("2w", 1209600),
    ("1h30m", 5400),
    ("1d12h", 129600),
    (" 12H ", 43200),
    ("3650d", MAX_DURATION),
])
def test_parse_duration_accepts(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", " ", "0", "0m", "-5", "5x", "m", "1.5h", "h1", "1h 30m", "3651d",
                                  "10years", "1hh", "forever"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_parse_duration_message_names_the_units() -> None:
    with pytest.raises(ValueError) as e:
        parse_duration("5x")
    assert str(e.value) == ("invalid duration '5x': use seconds or a number with a unit "
                            "s, m, h, d, w (e.g. 30m, 12h, 7d, 2w)")


@pytest.mark.parametrize(("text", "expected"), [
    ("2026-11-25T09:30:00Z", "2026-11-25T09:30:00Z"),
    ("2026-11-25T09:30:00z", "2026-11-25T09:30:00Z"),
    ("2026-11-25T10:30+01:00", "2026-11-25T09:30:00Z"),
    ("2026-11-25T09:30", "2026-11-25T09:30:00Z"),
    ("2026-11-25", "2026-11-25T00:00:00Z"),
    ("2026-11-25T01:00:00-05:00", "2026-11-25T06:00:00Z"),
])
def test_parse_at(text: str, expected: str) -> None:
    assert parse_at(text) == expected


@pytest.mark.parametrize("text", ["", "tomorrow", "2026-13-01", "25/11/2026"])
def test_parse_at_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid time"):
        parse_at(text)


def test_parse_filters_groups_ports_by_protocol() -> None:
    assert parse_filters(["tcp/80", "udp/1000-2000", "tcp/8000-8100", "icmp"]) == [
        {"protocol": "tcp", "ports": ["80", "8000-8100"]},
        {"protocol": "udp", "ports": ["1000-2000"]},
        {"protocol": "icmp", "ports": []},
    ]


def test_parse_filters_whole_protocol_wins_over_ports() -> None:
    assert parse_filters(["tcp/80", "tcp", "tcp/443"]) == [{"protocol": "tcp", "ports": []}]


def test_parse_filters_comma_list_and_normalisation() -> None:
    assert parse_filters(["TCP/80,443,80", "udp/53-53"]) == [
        {"protocol": "tcp", "ports": ["80", "443"]},
        {"protocol": "udp", "ports": ["53"]},
    ]


@pytest.mark.parametrize(("text", "message"), [
    ("sctp/80", "protocol must be tcp, udp or icmp"),
    ("icmp/8", "icmp takes no ports"),
    ("tcp/http", "ports are numbers"),
    ("tcp/0", "ports are 1-65535"),
    ("udp/70000", "ports are 1-65535"),
    ("tcp/200-100", "range start is above its end"),
    ("tcp/80-", "ports are numbers"),
    ("tcp/", "missing ports"),
])
def test_parse_filters_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_filters([text])


@pytest.mark.parametrize(("condition", "text"), [
    ({"property": "remote_ip", "operator": "is_in_cidr", "values": ["10.0.0.0/8", "192.0.2.7"]},
     "remote_ip in 10.0.0.0/8,192.0.2.7"),
    ({"property": "remote_ip", "operator": "is_not_in_cidr", "values": ["198.51.100.0/24"]},
     "remote_ip not_in 198.51.100.0/24"),
    ({"property": "provider_id", "operator": "is_in", "values": ["p1", "p2"]}, "provider_id in p1,p2"),
    ({"property": "client_verified", "operator": "is", "values": ["true"]}, "client_verified"),
    ({"property": "current_utc_datetime", "operator": "is_in_day_of_week_time_ranges",
      "values": ["F/09:00-17:00/Europe/Berlin", "M/09:00-17:00/Europe/Berlin", "S/true/UTC"]},
     "time in MF/09:00-17:00/Europe/Berlin;S/true/UTC"),
])
def test_condition_text(condition: dict[str, object], text: str) -> None:
    assert condition_text(condition) == text


def test_condition_text_round_trips_through_the_cli_parser() -> None:
    from firezone.portal.domain.policies import parse_condition_cli

    for text in ("remote_ip in 10.0.0.0/8,192.0.2.7", "client_verified",
                 "time in MTWRF/09:00-12:00,13:00-17:00/Europe/Berlin;S/true/UTC"):
        cond = parse_condition_cli(text)
        assert parse_condition_cli(condition_text(cond)) == cond
