"""The policy engine: condition validation and access decisions (pure; time is a parameter).

Model (DESIGN.md "Resources and policies"): a policy grants one group access to one resource.
Access is denied unless some policy allows it; the candidate policies of a request (those of the
resource whose group the actor is in) OR together, and inside one policy *all* conditions must
hold. A disabled policy never allows.

Conditions are JSON objects ``{"property", "operator", "values"}``:

============================  =====================================  ==============================
property                      operators                              values
============================  =====================================  ==============================
``remote_ip``                 ``is_in_cidr``, ``is_not_in_cidr``      IPs or CIDRs
``provider_id``               ``is_in``, ``is_not_in``                identity-provider ids
``current_utc_datetime``      ``is_in_day_of_week_time_ranges``      ``"<D>/<ranges>/<IANA tz>"``
``client_verified``           ``is``                                 ``["true"]``
============================  =====================================  ==============================

(``auth_provider_id`` is accepted as a spelling of ``provider_id``.) An unknown remote IP or
provider fails closed, for both the positive and the negative operator.

Time windows: ``D`` is one of ``M T W R F S U`` (Monday..Sunday) — a day set such as
``MTWRF``, ``M-F``, ``Mon-Fri`` or ``M,W,F`` is accepted too and normalized to one value per
day; ``ranges`` is ``true`` (the whole day) or comma-separated ``HH[:MM[:SS]]-HH[:MM[:SS]]``;
``24:00`` is allowed as an end. A range is half-open, ``[start, end)``, on the *wall clock* of
the time zone: the condition holds at instant ``t`` when ``t`` shown in that zone falls in a
range of that weekday. Several values OR together (they may use different zones). Windows that
touch, also across midnight and from Sunday into Monday, form one window. DST follows from the
wall-clock rule: on a spring-forward day the skipped hour matches nothing (01:00-03:00
Europe/Berlin lasts one real hour), on a fall-back day the repeated hour matches twice
(01:00-03:00 lasts three real hours, and 01:00-02:30 holds, stops at the first 02:30, and holds
again after the clocks go back).

An allowing policy expires at the first instant its time conditions stop holding ("the end of
the window", exact to the second across DST changes; ``now`` is floored to whole seconds) or at
the token expiry, whichever comes first. The window end is searched at most 400 days ahead
(a weekly window ends within eight days or never); one that never ends gives no expiry. Among several allowing
policies the longest-lived one is chosen (no expiry beats any expiry; ties go to the earlier
policy).

Compiled conditions (parsed networks, zones, weekly windows) are cached by their
``(property, operator, values)`` so evaluating a decision does no parsing.
"""

from __future__ import annotations

import bisect
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from firezone.portal.domain.resources import ValidationError

__all__ = [
    "OPERATORS",
    "REASON_ALLOWED",
    "REASON_DISABLED",
    "REASON_NO_POLICY",
    "REASON_VIOLATED",
    "ConditionResult",
    "Decision",
    "EvalContext",
    "PolicyInput",
    "PolicyResult",
    "conditions_summary",
    "evaluate",
    "evaluate_policy",
    "explain_lines",
    "parse_condition_cli",
    "validate_condition",
    "validate_conditions",
]

OPERATORS: dict[str, tuple[str, ...]] = {
    "remote_ip": ("is_in_cidr", "is_not_in_cidr"),
    "provider_id": ("is_in", "is_not_in"),
    "current_utc_datetime": ("is_in_day_of_week_time_ranges",),
    "client_verified": ("is",),
}
_PROPERTY_ALIASES = {"auth_provider_id": "provider_id"}

DAYS = "MTWRFSU"  # index = datetime.weekday()
_WEEKDAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
DAY_SECONDS = 86_400
WEEK_SECONDS = 7 * DAY_SECONDS
# 1970-01-01 was a Thursday (weekday 3): shifts epoch seconds to "seconds since a Monday 00:00".
_EPOCH_WEEK_SHIFT = 3 * DAY_SECONDS

REASON_ALLOWED = "allowed"
REASON_NO_POLICY = "no policy"
REASON_DISABLED = "policy disabled"
REASON_VIOLATED = "conditions not met"

# --------------------------------------------------------------------------------------------
# Public data types


@dataclass(frozen=True, slots=True)
class EvalContext:
    """What is known about one access request; ``now`` must be timezone-aware."""

    now: datetime
    remote_ip: str | None = None
    provider_id: str | None = None
    client_verified: bool = False
    token_expires_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class PolicyInput:
    """One candidate policy as the store hands it to :func:`evaluate`."""

    id: str
    group_id: str
    resource_id: str
    conditions: tuple[Mapping[str, Any], ...] = ()
    disabled: bool = False
    description: str | None = None


@dataclass(frozen=True, slots=True)
class ConditionResult:
    """The outcome of one condition; ``expires_at`` only for a holding time condition."""

    index: int
    property: str
    operator: str
    ok: bool
    expires_at: datetime | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class PolicyResult:
    """The outcome of one policy (``fz policy explain`` renders these)."""

    policy_id: str
    allowed: bool
    expires_at: datetime | None
    violated_properties: tuple[str, ...]
    conditions: tuple[ConditionResult, ...] = ()
    disabled: bool = False


@dataclass(frozen=True, slots=True)
class Decision:
    """An access decision.

    ``per_policy`` has one ``(policy_id, violated_properties)`` per candidate, in input order; a
    disabled policy shows ``("disabled",)`` there but adds nothing to ``violated_properties``.
    """

    allowed: bool
    policy_id: str | None
    expires_at: datetime | None
    violated_properties: tuple[str, ...]
    per_policy: tuple[tuple[str, tuple[str, ...]], ...]
    reason: str = ""
    results: tuple[PolicyResult, ...] = field(default=(), compare=False)


# --------------------------------------------------------------------------------------------
# Validation


def _err(prefix: str, name: str, message: str) -> ValidationError:
    if not name:
        return ValidationError(prefix or "condition", message)
    return ValidationError(f"{prefix}.{name}" if prefix else name, message)


_TIME_RE = re.compile(r"([0-9]{1,2})(?::([0-9]{2}))?(?::([0-9]{2}))?")


def _parse_clock(text: str, *, is_end: bool) -> int:
    m = _TIME_RE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"{text.strip()!r} is not a time (HH[:MM[:SS]])")
    h, mi, s = int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0)
    if mi > 59 or s > 59 or h > 24 or (h == 24 and (mi or s)):
        raise ValueError(f"{text.strip()!r} is not a valid time of day")
    if h == 24 and not is_end:
        raise ValueError("24:00 can only end a range")
    return h * 3600 + mi * 60 + s


def _format_clock(sec: int) -> str:
    h, rest = divmod(sec, 3600)
    m, s = divmod(rest, 60)
    return f"{h:02d}:{m:02d}" if s == 0 else f"{h:02d}:{m:02d}:{s:02d}"


def _merge(intervals: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


@dataclass(frozen=True, slots=True)
class _DayWindow:
    day: int
    ranges: tuple[tuple[int, int], ...]  # merged, seconds since local midnight, half-open
    tz: str


_DAY_NAMES = {
    **{name[:3]: i for i, name in enumerate(_WEEKDAY_NAMES)},
    **{name: i for i, name in enumerate(_WEEKDAY_NAMES)},
}


def _parse_day(token: str, spec: str) -> int:
    t = token.strip()
    if len(t) == 1 and t.upper() in DAYS:
        return DAYS.index(t.upper())
    if t.lower() in _DAY_NAMES:
        return _DAY_NAMES[t.lower()]
    raise ValueError(
        f"day {spec.strip()!r} must be one of M T W R F S U (Monday..Sunday), a run like MTWRF, "
        "a range like M-F or Mon-Fri, or a comma list like M,W,F"
    )


def _parse_days(spec: str) -> list[int]:
    """Parse a day spec: ``M``, ``MTWRF``, ``M-F``, ``Mon-Fri``, ``M,W,F`` -> sorted weekdays."""
    days: set[int] = set()
    for raw in spec.split(","):
        part = raw.strip()
        if "-" in part:
            a, _, b = part.partition("-")
            lo, hi = _parse_day(a, spec), _parse_day(b, spec)
            days.update(range(lo, hi + 1) if lo <= hi else [*range(lo, 7), *range(hi + 1)])
        elif len(part) > 1 and all(ch.upper() in DAYS for ch in part):
            days.update(DAYS.index(ch.upper()) for ch in part)
        else:
            days.add(_parse_day(part, spec))
    return sorted(days)


def _parse_time_value(value: object) -> list[_DayWindow]:
    if not isinstance(value, str):
        raise ValueError("must be a string '<D>/<ranges>/<IANA time zone>'")  # noqa: TRY004 - user input
    parts = value.strip().split("/", 2)
    if len(parts) != 3:
        raise ValueError(
            f"{value!r} must look like '<D>/<ranges>/<IANA time zone>', e.g. "
            "'M/09:00-17:00/Europe/Berlin'"
        )
    day_text, ranges_text, tz = (p.strip() for p in parts)
    days = _parse_days(day_text)
    if not tz:
        raise ValueError(f"{value!r} has no time zone")
    _zone(tz)
    if not ranges_text:
        raise ValueError(f"{value!r} has no time ranges; use HH:MM-HH:MM or true")
    ranges: list[tuple[int, int]] = []
    if ranges_text.lower() == "true":
        ranges.append((0, DAY_SECONDS))
    else:
        for piece in ranges_text.split(","):
            start_text, dash, end_text = piece.partition("-")
            if not dash:
                raise ValueError(f"range {piece.strip()!r} must look like HH:MM-HH:MM")
            start = _parse_clock(start_text, is_end=False)
            end = _parse_clock(end_text, is_end=True)
            if start >= end:
                raise ValueError(
                    f"range {piece.strip()!r} must start before it ends; split a range "
                    "that crosses midnight across two days"
                )
            ranges.append((start, end))
    merged = tuple(_merge(ranges))
    return [_DayWindow(day, merged, tz) for day in days]


def _format_time_value(w: _DayWindow) -> str:
    if w.ranges == ((0, DAY_SECONDS),):
        text = "true"
    else:
        text = ",".join(f"{_format_clock(s)}-{_format_clock(e)}" for s, e in w.ranges)
    return f"{DAYS[w.day]}/{text}/{w.tz}"


_zone_cache: dict[str, ZoneInfo] = {}


def _zone(key: str) -> ZoneInfo:
    zi = _zone_cache.get(key)
    if zi is None:
        try:
            zi = ZoneInfo(key)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            raise ValueError(f"unknown IANA time zone {key!r}") from None
        _zone_cache[key] = zi
    return zi


def validate_condition(c: object, index: int | None = None) -> dict[str, Any]:
    """Validate one condition and return it normalized.

    Errors are :class:`ValidationError` with a field such as ``conditions[2].values[0]``; without
    an ``index`` the field is relative (``values[0]``, ``operator``; ``condition`` for the
    whole object), ready to be prefixed by a caller that knows the position.
    """
    prefix = f"conditions[{index}]" if index is not None else ""
    if not isinstance(c, Mapping):
        raise _err(prefix, "", "must be an object with property, operator and values")
    unknown = set(c) - {"property", "operator", "values"}
    if unknown:
        raise _err(prefix, "", f"unknown key(s): {', '.join(sorted(map(str, unknown)))}")
    prop = c.get("property")
    if isinstance(prop, str):
        prop = _PROPERTY_ALIASES.get(prop, prop)
    if not isinstance(prop, str) or prop not in OPERATORS:
        raise _err(prefix, "property", f"must be one of {', '.join(OPERATORS)}, not {prop!r}")
    op = c.get("operator")
    if op not in OPERATORS[prop]:
        raise _err(
            prefix,
            "operator",
            f"{prop} takes operator {' or '.join(OPERATORS[prop])}, not {op!r}",
        )
    values = c.get("values")
    if not isinstance(values, list | tuple) or not values:
        raise _err(prefix, "values", "must be a non-empty list")
    out: list[str] = []
    for j, v in enumerate(values):
        here = f"values[{j}]"
        if prop == "remote_ip":
            if not isinstance(v, str):
                raise _err(prefix, here, f"{v!r} is not an IP address or CIDR")
            try:
                norm = str(ipaddress.ip_network(v.strip(), strict=False))
            except ValueError:
                raise _err(prefix, here, f"{v!r} is not an IP address or CIDR") from None
        elif prop == "provider_id":
            if not isinstance(v, str) or not v.strip():
                raise _err(prefix, here, "must be a non-empty provider id")
            norm = v.strip()
        elif prop == "client_verified":
            if v is True or (isinstance(v, str) and v.strip().lower() == "true"):
                norm = "true"
            else:
                raise _err(prefix, here, f'must be "true", not {v!r}')
        else:
            try:
                windows = _parse_time_value(v)
            except ValueError as e:
                raise _err(prefix, here, str(e)) from None
            for w in windows:
                text = _format_time_value(w)
                if text not in out:
                    out.append(text)
            continue
        if norm not in out:
            out.append(norm)
    return {"property": prop, "operator": op, "values": out}


def validate_conditions(conditions: object) -> list[dict[str, Any]]:
    """Validate a policy's condition list (``None`` = no conditions)."""
    if conditions is None:
        return []
    if not isinstance(conditions, list | tuple):
        raise ValidationError("conditions", "must be a list")
    return [validate_condition(c, i) for i, c in enumerate(conditions)]


# --------------------------------------------------------------------------------------------
# CLI syntax

_CLI_PROPERTIES = {
    "remote_ip": "remote_ip",
    "ip": "remote_ip",
    "provider_id": "provider_id",
    "auth_provider_id": "provider_id",
    "provider": "provider_id",
    "current_utc_datetime": "current_utc_datetime",
    "time": "current_utc_datetime",
    "client_verified": "client_verified",
    "verified": "client_verified",
}
_CLI_OPERATORS = {
    "remote_ip": {
        "in": "is_in_cidr",
        "is_in": "is_in_cidr",
        "is_in_cidr": "is_in_cidr",
        "not_in": "is_not_in_cidr",
        "is_not_in": "is_not_in_cidr",
        "is_not_in_cidr": "is_not_in_cidr",
    },
    "provider_id": {
        "in": "is_in",
        "is_in": "is_in",
        "not_in": "is_not_in",
        "is_not_in": "is_not_in",
    },
    "current_utc_datetime": {
        "in": "is_in_day_of_week_time_ranges",
        "is_in": "is_in_day_of_week_time_ranges",
        "is_in_day_of_week_time_ranges": "is_in_day_of_week_time_ranges",
    },
    "client_verified": {"is": "is"},
}


def parse_condition_cli(text: str) -> dict[str, Any]:
    """Parse the CLI form of a condition and return it validated (see :func:`validate_condition`).

    Syntax: ``<property> <operator> <values>``.

    - ``remote_ip in 10.0.0.0/8,192.0.2.7`` / ``remote_ip not_in 198.51.100.0/24``
      (the JSON names ``is_in_cidr`` / ``is_not_in_cidr`` work too; ``ip`` = ``remote_ip``);
    - ``provider_id in <id-or-name>,<id-or-name>`` / ``provider_id not_in <id-or-name>``
      (``provider`` works too; values are separated by commas only, so names may contain
      spaces; the portal maps provider names to ids when it stores the policy);
    - ``time in M-F/09:00-17:00/Europe/Berlin;S,U/10:00-12:00,13:00-14:00/UTC``
      (``current_utc_datetime is_in_day_of_week_time_ranges`` is the long form): entries are
      separated by ``;`` or spaces; days are letters ``M T W R F S U``, runs like ``MTWRF``,
      ranges like ``M-F`` or ``Mon-Fri``, or comma lists; ``true`` = the whole day;
    - ``client_verified`` or ``client_verified is true`` (``verified`` works too).

    ``not in`` may be written ``not_in``, ``not-in`` or as two words. Raises
    :class:`ValidationError` (field ``condition`` or ``condition.values[i]``) on bad input.
    """
    tokens = text.split()
    if not tokens:
        raise ValidationError("condition", "is empty; e.g. 'remote_ip in 10.0.0.0/8'")
    prop = _CLI_PROPERTIES.get(tokens[0].lower())
    if prop is None:
        raise ValidationError(
            "condition",
            f"unknown property {tokens[0]!r}; use remote_ip, provider_id, time or client_verified",
        )
    rest = tokens[1:]
    if prop == "client_verified":
        if rest and [t.lower() for t in rest] not in (["is", "true"], ["true"]):
            raise ValidationError(
                "condition", "write 'client_verified' or 'client_verified is true'"
            )
        return validate_condition({"property": prop, "operator": "is", "values": ["true"]})
    if not rest:
        raise ValidationError("condition", f"{tokens[0]} needs an operator and values")
    op_token = rest[0].lower().replace("-", "_")
    if op_token == "not" and len(rest) > 1 and rest[1].lower() == "in":
        op_token, rest = "not_in", rest[1:]
    op = _CLI_OPERATORS[prop].get(op_token)
    if op is None:
        raise ValidationError(
            "condition",
            f"unknown operator {rest[0]!r} for {prop}; use "
            + " or ".join(k for k in ("in", "not_in") if k in _CLI_OPERATORS[prop]),
        )
    value_text = " ".join(rest[1:])
    if not value_text.strip():
        raise ValidationError("condition", f"{prop} {op} needs at least one value")
    values: list[str] = []
    if prop == "current_utc_datetime":
        for entry in re.split(r"[;\s]+", value_text.strip()):
            if not entry:
                continue
            day_spec, slash, remainder = entry.partition("/")
            if not slash:
                raise ValidationError(
                    "condition", f"{entry!r} must look like M-F/09:00-17:00/Europe/Berlin"
                )
            try:
                days = _parse_days(day_spec)
            except ValueError as e:
                raise ValidationError("condition", str(e)) from None
            values.extend(f"{DAYS[d]}/{remainder}" for d in days)
    elif prop == "provider_id":
        # Provider names may contain spaces: only commas separate them.
        values = [v.strip() for v in value_text.split(",") if v.strip()]
    else:
        values = [v for v in re.split(r"[,\s]+", value_text.strip()) if v]
    try:
        return validate_condition({"property": prop, "operator": op, "values": values})
    except ValidationError as e:
        raise ValidationError(f"condition.{e.field}", e.message) from None


# --------------------------------------------------------------------------------------------
# Time zones: UTC offsets as integer seconds, transitions found once per zone and year.


class _ZoneOffsets:
    """UTC offsets of one zone and the instants where they change, cached per UTC year.

    Offsets are probed daily and each change is bisected to the second, so two transitions
    within one day (none in the current tz database) would be missed.
    """

    __slots__ = ("_years", "zi")

    def __init__(self, zi: ZoneInfo) -> None:
        self.zi = zi
        # year -> (offset at the start of the year, [transition instants], [offsets after])
        self._years: dict[int, tuple[int, list[int], list[int]]] = {}

    def _probe(self, t: int) -> int:
        off = datetime.fromtimestamp(t, self.zi).utcoffset()
        assert off is not None
        return int(off.total_seconds())

    def _year(self, year: int) -> tuple[int, list[int], list[int]]:
        data = self._years.get(year)
        if data is not None:
            return data
        start = int(datetime(year, 1, 1, tzinfo=UTC).timestamp())
        end = int(datetime(year + 1, 1, 1, tzinfo=UTC).timestamp())
        first = prev_off = self._probe(start)
        instants: list[int] = []
        offsets: list[int] = []
        prev_t = start
        t = start
        while t < end:
            t = min(t + DAY_SECONDS, end)
            off = self._probe(t)
            if off != prev_off:
                lo, hi = prev_t, t  # offset(lo) == prev_off, offset(hi) == off
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    if self._probe(mid) == prev_off:
                        lo = mid
                    else:
                        hi = mid
                instants.append(hi)
                offsets.append(off)
                prev_off = off
            prev_t = t
        data = (first, instants, offsets)
        self._years[year] = data
        return data

    @staticmethod
    def _year_of(t: int) -> int:
        return datetime.fromtimestamp(t, UTC).year

    def offset(self, t: int) -> int:
        first, instants, offsets = self._year(self._year_of(t))
        i = bisect.bisect_right(instants, t)
        return first if i == 0 else offsets[i - 1]

    def next_transition(self, t: int, limit: int) -> int | None:
        """Return the first instant in ``(t, limit]`` where the offset changes, or ``None``."""
        year = self._year_of(t)
        while True:
            _, instants, _ = self._year(year)
            i = bisect.bisect_right(instants, t)
            if i < len(instants):
                return instants[i] if instants[i] <= limit else None
            year += 1
            if int(datetime(year, 1, 1, tzinfo=UTC).timestamp()) > limit:
                return None


_offsets_cache: dict[str, _ZoneOffsets] = {}


def _zone_offsets(key: str) -> _ZoneOffsets:
    zo = _offsets_cache.get(key)
    if zo is None:
        zo = _offsets_cache[key] = _ZoneOffsets(_zone(key))
    return zo


# --------------------------------------------------------------------------------------------
# Compiled conditions

# How far ahead a window end is searched; beyond it the window counts as never ending.
_HORIZON_SECONDS = 400 * DAY_SECONDS


class _WeeklyWindow:
    """The merged weekly wall-clock window of one time zone, in seconds since Monday 00:00."""

    __slots__ = ("always", "ends", "offsets", "starts", "wrap_len")

    def __init__(self, tz: str, days: Iterable[_DayWindow]) -> None:
        self.offsets = _zone_offsets(tz)
        merged = _merge(
            (d.day * DAY_SECONDS + s, d.day * DAY_SECONDS + e) for d in days for s, e in d.ranges
        )
        self.starts = [s for s, _ in merged]
        self.ends = [e for _, e in merged]
        self.always = merged == [(0, WEEK_SECONDS)]
        # A window ending at Sunday 24:00 continues into one starting Monday 00:00.
        self.wrap_len = merged[0][1] if merged and merged[0][0] == 0 else 0

    def _remaining(self, wall: int) -> int:
        """Seconds of window left from wall time ``wall`` (0 = outside the window)."""
        pos = (wall + _EPOCH_WEEK_SHIFT) % WEEK_SECONDS
        i = bisect.bisect_right(self.starts, pos) - 1
        if i < 0 or pos >= self.ends[i]:
            return 0
        rem = self.ends[i] - pos
        if self.ends[i] == WEEK_SECONDS:
            rem += self.wrap_len
        return rem

    def holds(self, t: int) -> bool:
        return self.always or self._remaining(t + self.offsets.offset(t)) > 0

    def exit_after(self, t: int, limit: int) -> int | None:
        """Return the first instant >= t where the window does not hold (``None``: not by limit)."""
        if self.always:
            return None
        while t <= limit:
            off = self.offsets.offset(t)
            rem = self._remaining(t + off)
            if rem == 0:
                return t
            candidate = t + rem
            transition = self.offsets.next_transition(t, min(candidate, limit))
            if transition is None or transition > candidate:
                return candidate if candidate <= limit else None
            if transition == candidate and not self.holds(candidate):
                return candidate
            t = transition
        return None


class _Compiled:
    """A parsed condition; ``check`` returns (ok, expiry instant or None, reason)."""

    __slots__ = ("error", "ids", "nets", "op", "prop", "windows")

    def __init__(self, prop: str, op: str, values: Any) -> None:
        self.prop = prop
        self.op = op
        self.error: str | None = None
        self.nets: tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]] | None = None
        self.ids: frozenset[str] = frozenset()
        self.windows: tuple[_WeeklyWindow, ...] = ()
        try:
            if isinstance(values, tuple):
                values = list(values)
            norm = validate_condition({"property": prop, "operator": op, "values": values})
        except ValidationError as e:
            self.error = f"invalid condition ({e.message})"
            return
        self.prop = norm["property"]
        vals = norm["values"]
        if self.prop == "remote_ip":
            per_version: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
            for v in vals:
                net = ipaddress.ip_network(v)
                per_version[net.version].append(
                    (int(net.network_address), int(net.broadcast_address) + 1)
                )
            v4, v6 = _merge(per_version[4]), _merge(per_version[6])
            self.nets = (
                ([s for s, _ in v4], [e for _, e in v4]),
                ([s for s, _ in v6], [e for _, e in v6]),
            )
        elif self.prop == "provider_id":
            self.ids = frozenset(vals)
        elif self.prop == "current_utc_datetime":
            by_tz: dict[str, list[_DayWindow]] = {}
            for v in vals:
                for w in _parse_time_value(v):
                    by_tz.setdefault(w.tz, []).append(w)
            self.windows = tuple(_WeeklyWindow(tz, ws) for tz, ws in by_tz.items())

    def check(self, ctx: _Ctx) -> tuple[bool, int | None, str]:
        if self.error is not None:
            return False, None, self.error
        prop = self.prop
        if prop == "remote_ip":
            ip = ctx.ip
            if ip is None:
                return False, None, "remote IP unknown"
            assert self.nets is not None
            starts, ends = self.nets[0] if ip.version == 4 else self.nets[1]
            n = int(ip)
            i = bisect.bisect_right(starts, n) - 1
            inside = i >= 0 and n < ends[i]
            want = self.op == "is_in_cidr"
            if inside == want:
                return True, None, ""
            return False, None, f"{ip} is {'not ' if want else ''}in the listed networks"
        if prop == "provider_id":
            pid = ctx.provider_id
            if pid is None:
                return False, None, "identity provider unknown"
            inside = pid in self.ids
            want = self.op == "is_in"
            if inside == want:
                return True, None, ""
            return False, None, f"provider {pid} is {'not ' if want else ''}listed"
        if prop == "client_verified":
            if ctx.verified:
                return True, None, ""
            return False, None, "client is not verified"
        # current_utc_datetime
        t = ctx.now_ts
        holding = [w for w in self.windows if w.holds(t)]
        if not holding:
            return False, None, "outside the allowed time windows"
        return True, self._exit(t, ctx.limit), ""

    def _exit(self, t: int, limit: int) -> int | None:
        # The values OR together: the condition stops holding once no window holds.
        while t <= limit:
            exits = []
            holding = False
            for w in self.windows:
                if w.holds(t):
                    holding = True
                    e = w.exit_after(t, limit)
                    if e is None:
                        return None
                    exits.append(e)
            if not holding:
                return t
            t = max(exits)
        return None


_compiled_cache: dict[tuple[Any, Any, tuple[Any, ...]], _Compiled] = {}
_COMPILED_CACHE_MAX = 100_000


def _compile(c: Mapping[str, Any]) -> _Compiled:
    values = c.get("values")
    try:
        key = (
            c.get("property"),
            c.get("operator"),
            tuple(values) if isinstance(values, list | tuple) else (values,),
        )
        hash(key)
    except TypeError:
        # Not cacheable, and never valid: compile it uncached so it fails closed.
        return _Compiled(str(c.get("property")), str(c.get("operator")), values)
    compiled = _compiled_cache.get(key)
    if compiled is None:
        if len(_compiled_cache) >= _COMPILED_CACHE_MAX:
            _compiled_cache.clear()
        compiled = _compiled_cache[key] = _Compiled(str(key[0]), str(key[1]), values)
    return compiled


# --------------------------------------------------------------------------------------------
# Evaluation


@dataclass(slots=True)
class _Ctx:
    now_ts: int
    limit: int
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    provider_id: str | None
    verified: bool
    token_exp: datetime | None


def _prepare(ctx: EvalContext) -> _Ctx:
    if ctx.now.tzinfo is None or ctx.now.utcoffset() is None:
        raise ValueError("EvalContext.now must be timezone-aware")
    if ctx.token_expires_at is not None and ctx.token_expires_at.tzinfo is None:
        raise ValueError("EvalContext.token_expires_at must be timezone-aware")
    # Whole seconds: the time windows have one-second resolution.
    now_ts = int(ctx.now.timestamp() // 1)
    limit = now_ts + _HORIZON_SECONDS
    if ctx.token_expires_at is not None:
        limit = min(limit, int(-(-ctx.token_expires_at.timestamp() // 1)))
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    if ctx.remote_ip:
        try:
            ip = ipaddress.ip_address(ctx.remote_ip.split("%", 1)[0])
        except ValueError:
            ip = None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
    token_exp = ctx.token_expires_at.astimezone(UTC) if ctx.token_expires_at else None
    return _Ctx(
        now_ts, max(limit, now_ts), ip, ctx.provider_id, bool(ctx.client_verified), token_exp
    )


def _to_dt(ts: int) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _earliest(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def _evaluate_policy(policy: PolicyInput, c: _Ctx) -> PolicyResult:
    if policy.disabled:
        return PolicyResult(policy.id, False, None, ("disabled",), (), disabled=True)
    results: list[ConditionResult] = []
    violated: list[str] = []
    cond_exp: int | None = None
    for i, cond in enumerate(policy.conditions):
        if not isinstance(cond, Mapping):
            prop, op, ok, exp, reason = "conditions", "", False, None, "invalid condition"
        else:
            compiled = _compile(cond)
            prop, op = compiled.prop, compiled.op
            ok, exp, reason = compiled.check(c)
        if ok:
            if exp is not None:
                cond_exp = exp if cond_exp is None else min(cond_exp, exp)
            results.append(
                ConditionResult(i, prop, op, True, _to_dt(exp) if exp is not None else None, reason)
            )
        else:
            if prop not in violated:
                violated.append(prop)
            results.append(ConditionResult(i, prop, op, False, None, reason))
    if violated:
        return PolicyResult(policy.id, False, None, tuple(violated), tuple(results))
    expires = _earliest(c.token_exp, _to_dt(cond_exp) if cond_exp is not None else None)
    return PolicyResult(policy.id, True, expires, (), tuple(results))


def evaluate_policy(policy: PolicyInput, ctx: EvalContext) -> PolicyResult:
    """Evaluate one policy with per-condition detail."""
    return _evaluate_policy(policy, _prepare(ctx))


def evaluate(policies: Iterable[PolicyInput], ctx: EvalContext) -> Decision:
    """Decide one access request from its candidate policies (see the module docstring)."""
    c = _prepare(ctx)
    results = tuple(_evaluate_policy(p, c) for p in policies)
    per_policy = tuple((r.policy_id, r.violated_properties) for r in results)
    best: PolicyResult | None = None
    for r in results:
        if not r.allowed:
            continue
        if (
            best is None
            or best.expires_at is not None
            and (r.expires_at is None or r.expires_at > best.expires_at)
        ):
            best = r
    if best is not None:
        return Decision(
            True, best.policy_id, best.expires_at, (), per_policy, REASON_ALLOWED, results
        )
    if not results:
        return Decision(False, None, None, (), (), REASON_NO_POLICY, ())
    violated: list[str] = []
    for r in results:
        if not r.disabled:
            for p in r.violated_properties:
                if p not in violated:
                    violated.append(p)
    reason = REASON_DISABLED if all(r.disabled for r in results) else REASON_VIOLATED
    return Decision(False, None, None, tuple(violated), per_policy, reason, results)


def explain_lines(decision: Decision) -> list[str]:
    """Render a decision as human-readable lines (for ``fz policy explain``)."""
    lines: list[str] = []
    if decision.allowed:
        until = decision.expires_at.isoformat() if decision.expires_at else "no expiry"
        lines.append(f"allowed by policy {decision.policy_id} until {until}")
    else:
        lines.append(f"denied: {decision.reason}")
    for r in decision.results:
        if r.disabled:
            lines.append(f"  policy {r.policy_id}: disabled")
            continue
        verdict = "allows" if r.allowed else "denies (" + ", ".join(r.violated_properties) + ")"
        lines.append(f"  policy {r.policy_id}: {verdict}")
        for cr in r.conditions:
            mark = "ok" if cr.ok else "FAILED"
            extra = f": {cr.reason}" if cr.reason else ""
            if cr.ok and cr.expires_at is not None:
                extra = f": until {cr.expires_at.isoformat()}"
            lines.append(f"    [{cr.index}] {cr.property} {cr.operator} {mark}{extra}")
    return lines


def conditions_summary(conditions: Sequence[Mapping[str, Any]]) -> str:
    """One-line rendering of a condition list for tables."""
    if not conditions:
        return "-"
    return "; ".join(
        f"{c.get('property')} {c.get('operator')} {','.join(map(str, c.get('values') or []))}"
        for c in conditions
    )
