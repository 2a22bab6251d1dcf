"""DNS resource patterns: validation, matching (`*`, `**`, `?`), precedence."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from firezone.proto.dns.patterns import (
    Pattern,
    PatternTable,
    best_match,
    compile_pattern,
    normalize_name,
    validate_pattern,
)

# --------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    ("given_", "expected"),
    [
        ("example.com", "example.com"),
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),
        ("*.example.com", "*.example.com"),
        ("**.example.com", "**.example.com"),
        ("us-east?.example.com", "us-east?.example.com"),
        ("foo.*.example.com", "foo.*.example.com"),
        ("foo.**.example.com", "foo.**.example.com"),
        ("web-*.example.com", "web-*.example.com"),
        ("intranet", "intranet"),
        ("*.corp", "*.corp"),
        ("**.internal", "**.internal"),
        ("_ldap._tcp.example.com", "_ldap._tcp.example.com"),
        ("a" * 63 + ".com", "a" * 63 + ".com"),
        ("*.example.co.uk", "*.example.co.uk"),
    ],
)
def test_valid_patterns_are_normalized(given_: str, expected: str) -> None:
    assert validate_pattern(given_) == expected


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("", "must not be empty"),
        (".", "must not be empty"),
        (" example.com", "must not contain spaces"),
        ("exa mple.com", "contains ' '"),
        ("10.0.0.1", "is an IP address; use a resource of type ip"),
        ("2001:db8::1", "is an IP address; use a resource of type ip"),
        ("10.0.0.0/8", "use a resource of type cidr"),
        ("example.com:443", "must not contain a port"),
        ("a..example.com", "empty labels"),
        (".example.com", "empty labels"),
        ("example.com..", "empty labels"),
        ("a" * 64 + ".com", "longer than 63 characters"),
        ("a." * 126 + "com", "at most 253 characters"),
        ("exa$mple.com", "contains '$'"),
        ("a**.example.com", "'**' must be a whole label"),
        ("**b.example.com", "'**' must be a whole label"),
        ("example.*", "top-level domain must not contain wildcards"),
        ("example.c?m", "top-level domain must not contain wildcards"),
        ("*", "top-level domain must not contain wildcards"),
        ("**", "top-level domain must not contain wildcards"),
        ("10.0.0", "must not be all digits"),
        ("host.123", "must not be all digits"),
        ("foo.localhost", "'localhost' top-level domain is not allowed"),
        ("localhost", "'localhost' top-level domain is not allowed"),
        ("*.com", "must name a domain under '.com'"),
        ("**.com", "must name a domain under '.com'"),
        ("?.io", "must name a domain under '.io'"),
        ("*.*.org", "must name a domain under '.org'"),
        ("*.co.uk", "must name a domain under '.co.uk'"),
        ("**.com.au", "must name a domain under '.com.au'"),
    ],
)
def test_invalid_patterns_have_precise_messages(bad: str, message: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        validate_pattern(bad)
    assert message in str(info.value)


def test_non_string_is_rejected() -> None:
    with pytest.raises(ValueError, match="must be a string"):
        validate_pattern(42)  # type: ignore[arg-type]


def test_compile_pattern_validates() -> None:
    with pytest.raises(ValueError, match="IP address"):
        compile_pattern("192.0.2.1")


# --------------------------------------------------------------------------------------------
# matching


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        # exact
        ("example.com", "example.com", True),
        ("example.com", "EXAMPLE.com.", True),
        ("example.com", "a.example.com", False),
        ("example.com", "xexample.com", False),
        # * = one label or the apex
        ("*.example.com", "example.com", True),
        ("*.example.com", "a.example.com", True),
        ("*.example.com", "A.Example.Com.", True),
        ("*.example.com", "a.b.example.com", False),
        ("*.example.com", "aexample.com", False),
        ("*.example.com", "example.org", False),
        ("*.example.com", ".example.com", False),
        ("*.example.com", "a..example.com", False),
        # ** = apex and any depth
        ("**.example.com", "example.com", True),
        ("**.example.com", "a.example.com", True),
        ("**.example.com", "a.b.c.example.com", True),
        ("**.example.com", "aexample.com", False),
        ("**.example.com", "example.com.evil.net", False),
        ("**.example.com", "a..example.com", False),
        # ? = exactly one character
        ("us-east?.example.com", "us-east1.example.com", True),
        ("us-east?.example.com", "us-eastx.example.com", True),
        ("us-east?.example.com", "us-east.example.com", False),
        ("us-east?.example.com", "us-east12.example.com", False),
        ("??.example.com", "ab.example.com", True),
        ("??.example.com", "a.example.com", False),
        # * inside a label
        ("web-*.example.com", "web-.example.com", True),
        ("web-*.example.com", "web-01.example.com", True),
        ("web-*.example.com", "web.example.com", False),
        ("web-*.example.com", "web-01.a.example.com", False),
        ("web-*.example.com", "example.com", False),
        # wildcards mid-name
        ("foo.*.example.com", "foo.x.example.com", True),
        ("foo.*.example.com", "foo.example.com", False),
        ("foo.*.example.com", "foo.x.y.example.com", False),
        ("foo.**.example.com", "foo.example.com", True),
        ("foo.**.example.com", "foo.x.y.example.com", True),
        ("foo.**.example.com", "bar.x.example.com", False),
        ("a.**.b.**.example.com", "a.b.example.com", True),
        ("a.**.b.**.example.com", "a.x.b.y.z.example.com", True),
        ("a.**.b.**.example.com", "a.x.y.example.com", False),
        ("*.*.example.com", "a.b.example.com", True),
        ("*.*.example.com", "b.example.com", True),
        ("*.*.example.com", "example.com", False),
        # regex metacharacters in names are literal
        ("a-b.example.com", "a-b.example.com", True),
        ("**.example.com", "a+b.example.com", True),
        ("*.ex-ample.com", "x.exxample.com", False),
    ],
)
def test_matches(pattern: str, name: str, expected: bool) -> None:
    assert compile_pattern(pattern).matches(name) is expected


def test_normalize_name() -> None:
    assert normalize_name("WWW.Example.COM.") == "www.example.com"


# Independent reference matcher: recursion over labels and characters, no regex.
def _ref_label(p: str, s: str) -> bool:
    if not p:
        return not s
    if p[0] == "*":
        return any(_ref_label(p[1:], s[k:]) for k in range(len(s) + 1))
    if not s:
        return False
    return (p[0] == "?" or p[0] == s[0]) and _ref_label(p[1:], s[1:])


def _ref_labels(pl: list[str], nl: list[str], first: bool) -> bool:
    if not pl:
        return not nl
    head, rest = pl[0], pl[1:]
    if head == "**":
        return any(_ref_labels(rest, nl[k:], False) for k in range(len(nl) + 1))
    if head == "*" and first and _ref_labels(rest, nl, False):
        return True
    return bool(nl) and nl[0] != "" and _ref_label(head, nl[0]) and _ref_labels(rest, nl[1:], False)


def ref_match(pattern: str, name: str) -> bool:
    name = name.lower().removesuffix(".")
    return _ref_labels(pattern.split("."), name.split("."), True)


_PATTERN_LABELS = st.sampled_from(
    ["a", "b", "ab", "ba", "*", "**", "?", "a*", "*b", "?b", "a?", "*a*"]
)
_NAME_LABELS = st.sampled_from(["a", "b", "ab", "ba", "aab", "bb", "abab", "A", "Ab"])
_TLDS = st.sampled_from(["test", "corp"])


@st.composite
def _patterns(draw: st.DrawFn) -> str:
    labels = draw(st.lists(_PATTERN_LABELS, min_size=0, max_size=4))
    return ".".join([*labels, draw(_TLDS)])


@st.composite
def _names(draw: st.DrawFn) -> str:
    labels = draw(st.lists(_NAME_LABELS, min_size=0, max_size=5))
    name = ".".join([*labels, draw(_TLDS)])
    return name + "." if draw(st.booleans()) else name


@settings(max_examples=1500, deadline=None)
@given(_patterns(), _names())
def test_matches_agrees_with_reference(pattern: str, name: str) -> None:
    try:
        p = compile_pattern(pattern)
    except ValueError:
        assume(False)
    assert p.matches(name) == ref_match(p.text, name), (pattern, name)


@settings(max_examples=500, deadline=None)
@given(st.lists(_NAME_LABELS, min_size=0, max_size=4), _TLDS)
def test_star_star_matches_every_name_below(labels: list[str], tld: str) -> None:
    zone = f"zone.{tld}"
    name = ".".join([*labels, zone])
    assert compile_pattern(f"**.{zone}").matches(name)
    assert compile_pattern(f"*.{zone}").matches(name) is (len(labels) <= 1)


# --------------------------------------------------------------------------------------------
# precedence


def _sorted(texts: list[str]) -> list[str]:
    return [p.text for p in sorted(compile_pattern(t) for t in texts)]


def test_exact_names_sort_before_all_wildcards() -> None:
    assert _sorted(["**.example.com", "zzz.example.com", "*.a.example.com", "a.example.com"]) == [
        "a.example.com",
        "zzz.example.com",
        "*.a.example.com",
        "**.example.com",
    ]


def test_question_mark_before_star_before_double_star() -> None:
    assert _sorted(
        ["**.example.com", "*.example.com", "web-*.example.com", "web-?.example.com"]
    ) == [
        "web-?.example.com",
        "web-*.example.com",
        "*.example.com",
        "**.example.com",
    ]


def test_concrete_label_nearer_the_root_wins() -> None:
    # compared from the right: at the third label `b` (concrete) beats `**`
    assert _sorted(["a.**.example.com", "*.b.example.com"]) == [
        "*.b.example.com",
        "a.**.example.com",
    ]


def test_longer_pattern_with_same_suffix_is_more_specific() -> None:
    assert _sorted(["**.example.com", "foo.**.example.com"]) == [
        "foo.**.example.com",
        "**.example.com",
    ]


@pytest.mark.parametrize(
    ("name", "winner"),
    [
        ("a.b.example.com", "exact"),
        ("x.b.example.com", "star-b"),
        ("a.x.example.com", "a-starstar"),
        ("q.example.com", "star"),
        ("example.com", "star"),
        ("q.r.s.example.com", "starstar"),
        ("us-east1.example.com", "qmark"),
        ("other.org", None),
    ],
)
def test_best_match_picks_most_specific(name: str, winner: str | None) -> None:
    table = [
        (compile_pattern("**.example.com"), "starstar"),
        (compile_pattern("*.example.com"), "star"),
        (compile_pattern("a.**.example.com"), "a-starstar"),
        (compile_pattern("*.b.example.com"), "star-b"),
        (compile_pattern("a.b.example.com"), "exact"),
        (compile_pattern("us-east?.example.com"), "qmark"),
    ]
    assert best_match(name, table) == winner
    assert best_match(name, list(reversed(table))) == winner


def test_best_match_is_case_insensitive_and_ignores_trailing_dot() -> None:
    table = [(compile_pattern("Web.Example.com"), 1), (compile_pattern("*.example.com"), 2)]
    assert best_match("WEB.EXAMPLE.COM.", table) == 1
    assert best_match("Other.example.com.", table) == 2


def test_best_match_empty() -> None:
    assert best_match("a.example.com", []) is None


@settings(max_examples=1000, deadline=None)
@given(st.lists(_patterns(), min_size=1, max_size=6), _names())
def test_best_match_is_the_minimum_matching_sort_key(patterns: list[str], name: str) -> None:
    compiled: list[Pattern] = []
    for text in patterns:
        try:
            compiled.append(compile_pattern(text))
        except ValueError:
            continue
    assume(compiled)
    result = best_match(name, [(p, p) for p in compiled])
    matching = [p for p in compiled if ref_match(p.text, name)]
    if not matching:
        assert result is None
    else:
        assert result is not None
        assert result.sort_key == min(p.sort_key for p in matching)


def test_pattern_equality_and_hash() -> None:
    assert compile_pattern("*.Example.com") == compile_pattern("*.example.com")
    assert len({compile_pattern("a.test"), compile_pattern("A.test.")}) == 1
    assert repr(compile_pattern("a.test")) == "Pattern('a.test')"


# --------------------------------------------------------------------------------------------
# PatternTable


def test_pattern_anchor_is_the_wildcard_free_suffix() -> None:
    assert compile_pattern("a.b.example.com").anchor == "a.b.example.com"
    assert compile_pattern("*.example.com").anchor == "example.com"
    assert compile_pattern("foo.**.example.com").anchor == "example.com"
    assert compile_pattern("web-?.eu.example.com").anchor == "eu.example.com"


def test_pattern_table_insert_lookup_replace_remove() -> None:
    table: PatternTable[str] = PatternTable()
    table.insert("**.example.com", "all")
    table.insert(compile_pattern("*.b.example.com"), "b")
    table.insert("a.b.example.com", "exact")
    assert len(table) == 3
    assert table.lookup("A.B.Example.com.") == "exact"
    assert table.lookup("x.b.example.com") == "b"
    assert table.lookup("x.y.example.com") == "all"
    assert table.lookup("example.org") is None
    table.insert("*.B.example.com", "b2")  # same pattern: the value is replaced
    assert len(table) == 3
    assert table.lookup("x.b.example.com") == "b2"
    assert table.remove("*.b.example.com") is True
    assert table.remove("*.b.example.com") is False
    assert table.lookup("x.b.example.com") == "all"
    assert table.remove("a.b.example.com") is True
    assert table.remove("a.b.example.com") is False
    assert table.lookup("a.b.example.com") == "all"
    assert table.remove("**.example.com") is True
    assert len(table) == 0
    assert table.lookup("a.b.example.com") is None


def test_pattern_table_validates_text_patterns() -> None:
    table: PatternTable[int] = PatternTable()
    with pytest.raises(ValueError, match="must name a domain under"):
        table.insert("*.com", 1)


@settings(max_examples=500, deadline=None)
@given(st.lists(_patterns(), min_size=0, max_size=10), st.lists(_names(), min_size=1, max_size=5))
def test_pattern_table_agrees_with_best_match(patterns: list[str], names: list[str]) -> None:
    table: PatternTable[str] = PatternTable()
    entries: dict[str, Pattern] = {}
    for text in patterns:
        try:
            p = compile_pattern(text)
        except ValueError:
            continue
        table.insert(p, p.text)
        entries[p.text] = p
    assert len(table) == len(entries)
    for name in names:
        assert table.lookup(name) == best_match(name, [(p, p.text) for p in entries.values()])


# --------------------------------------------------------------------------------------------
# validation properties

_PATTERNISH = st.text(alphabet="abcXYZ019-_.*?:/ $é", max_size=40)


@settings(max_examples=2000, deadline=None)
@given(st.one_of(_PATTERNISH, _patterns(), _names()))
def test_validate_pattern_raises_only_value_error_and_is_idempotent(text: str) -> None:
    try:
        out = validate_pattern(text)
    except ValueError as e:
        assert str(e)  # always says what is wrong
        return
    assert validate_pattern(out) == out
    assert out == out.lower() and not out.endswith(".")
    assert len(out) <= 253 and all(0 < len(label) <= 63 for label in out.split("."))
    tld = out.rsplit(".", 1)[-1]
    assert "*" not in tld and "?" not in tld
    if not compile_pattern(out).is_wildcard:
        assert compile_pattern(out).matches(out)
        assert compile_pattern(out).matches(out.upper() + ".")


@settings(max_examples=1000, deadline=None)
@given(_patterns(), _names())
def test_matching_ignores_case_and_trailing_dot(pattern: str, name: str) -> None:
    try:
        p = compile_pattern(pattern)
    except ValueError:
        return
    assert p.matches(name) == p.matches(name.upper()) == p.matches(name.rstrip(".") + ".")


class PatternTableMachine(RuleBasedStateMachine):
    """Interleaved inserts, replacements and removals against a plain dict + best_match."""

    def __init__(self) -> None:
        super().__init__()
        self.table: PatternTable[int] = PatternTable()
        self.model: dict[str, tuple[Pattern, int]] = {}
        self.counter = 0

    @rule(text=_patterns())
    def insert(self, text: str) -> None:
        try:
            p = compile_pattern(text)
        except ValueError:
            return
        self.counter += 1
        self.table.insert(p, self.counter)
        self.model[p.text] = (p, self.counter)

    @rule(text=_patterns())
    def remove(self, text: str) -> None:
        try:
            p = compile_pattern(text)
        except ValueError:
            return
        assert self.table.remove(p) is (self.model.pop(p.text, None) is not None)

    @rule(name=_names())
    def lookup(self, name: str) -> None:
        assert self.table.lookup(name) == best_match(name, self.model.values())

    @invariant()
    def same_size(self) -> None:
        assert len(self.table) == len(self.model)


PatternTableMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None
)
test_pattern_table_state_machine = PatternTableMachine.TestCase
