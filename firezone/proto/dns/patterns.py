"""DNS resource address patterns: validation, matching and precedence.

A pattern is a domain name whose labels may contain wildcards; it is matched label-wise and
case-insensitively against a query name (a trailing dot on either side is ignored):

- a plain name matches exactly that name;
- ``?`` matches exactly one character inside a label (``us-east?.example.com``);
- ``*`` inside a label matches zero or more characters of that label (``web-*.example.com``);
- a label that is exactly ``*`` matches exactly one label, and as the *leftmost* label it also
  matches the apex: ``*.example.com`` matches ``example.com`` and ``a.example.com``, not
  ``a.b.example.com``; ``foo.*.example.com`` matches ``foo.x.example.com`` only;
- a label that is exactly ``**`` matches zero or more labels: ``**.example.com`` matches the
  apex and every name below it, ``foo.**.example.com`` matches ``foo.example.com`` and
  ``foo.a.b.example.com``.

Precedence (:attr:`Pattern.sort_key`, smallest = most specific): every exact name comes before
every wildcard pattern; wildcard patterns are then compared label by label *from the right*,
where at one position a plain label < a label with ``?`` < a label with ``*`` inside < ``*`` <
``**``; a pattern that is a right-hand prefix of another (``**.example.com`` vs
``foo.**.example.com``) sorts after it, since the longer one is more specific; ties break on the
text. So for ``a.b.example.com``: ``a.b.example.com`` > ``*.b.example.com`` >
``a.**.example.com`` > ``*.example.com`` (no match) > ``**.example.com``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Generic, TypeVar

__all__ = [
    "Pattern",
    "PatternTable",
    "best_match",
    "compile_pattern",
    "normalize_name",
    "validate_pattern",
]

T = TypeVar("T")

# RFC 1035 §2.3.4: names up to 255 octets on the wire = 253 characters in text, labels <= 63.
MAX_NAME_LEN = 253
MAX_LABEL_LEN = 63

_LABEL_CHARS = re.compile(r"[a-z0-9_*?-]+")

# TLDs (and public second-level suffixes) under which a pattern must name a concrete registrable
# domain: `*.com` or `**.co.uk` would capture a whole public namespace.
_SUFFIX_TEXT = (
    "com net org edu gov mil int info biz name pro mobi aero coop museum asia tel travel jobs "
    "cat io co ai app dev me tv cc ly gg sh to fm am xyz online site tech store cloud page ac "
    "ad ae af ag ar at au be bg br by ca ch cl cn cz de dk ee es eu fi fr gr hk hr hu id ie il "
    "in ir is it jp kr kz lt lu lv mx my nl no nz ph pk pl pt ro rs ru sa se sg si sk th tr tw "
    "ua uk us uz vn za co.uk org.uk ac.uk gov.uk me.uk ltd.uk plc.uk net.uk com.au net.au "
    "org.au edu.au gov.au co.nz org.nz net.nz co.jp ne.jp or.jp ac.jp com.br net.br org.br "
    "com.cn net.cn org.cn co.in net.in org.in co.za org.za com.mx com.tr com.tw co.kr or.kr "
    "com.sg com.hk co.il "
)
_PUBLIC_SUFFIXES = frozenset(_SUFFIX_TEXT.split())


def normalize_name(name: str) -> str:
    """Return a query name in the form patterns match against: lowercase, no trailing dot."""
    name = name.lower()
    name = name.removesuffix(".")
    return name


def _is_wild_only(label: str) -> bool:
    return all(ch in "*?" for ch in label)


def validate_pattern(address: str) -> str:
    """Validate a DNS resource address and return it normalized (lowercase, no trailing dot).

    Raises ``ValueError`` with a message saying exactly what is wrong.
    """
    if not isinstance(address, str):
        raise ValueError("must be a string")  # noqa: TRY004 - user input
    if address != address.strip():
        raise ValueError("must not contain spaces")
    name = address.lower()
    if name.endswith(".") and not name.endswith(".."):
        name = name[:-1]
    if not name:
        raise ValueError("must not be empty")
    if len(name) > MAX_NAME_LEN:
        raise ValueError(f"must be at most {MAX_NAME_LEN} characters long")
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        raise ValueError("is an IP address; use a resource of type ip")
    if "/" in name:
        raise ValueError("must not contain '/'; use a resource of type cidr for networks")
    if ":" in name:
        raise ValueError("must not contain a port or ':'")
    labels = name.split(".")
    for label in labels:
        if not label:
            raise ValueError("must not contain empty labels ('..' or a leading dot)")
        if len(label) > MAX_LABEL_LEN:
            raise ValueError(f"label {label!r} is longer than {MAX_LABEL_LEN} characters")
        if not _LABEL_CHARS.fullmatch(label):
            bad = next(ch for ch in label if not _LABEL_CHARS.fullmatch(ch))
            raise ValueError(
                f"label {label!r} contains {bad!r}; only letters, digits, '-', '_' "
                "and the wildcards '*', '**', '?' are allowed"
            )
        if "**" in label and label != "**":
            raise ValueError(f"'**' must be a whole label, not part of {label!r}")
    tld = labels[-1]
    if "*" in tld or "?" in tld:
        raise ValueError("the top-level domain must not contain wildcards")
    if tld.isdigit():
        raise ValueError("the top-level domain must not be all digits (an incomplete IP address?)")
    if tld == "localhost":
        raise ValueError("the 'localhost' top-level domain is not allowed")
    for cut in range(1, len(labels)):
        suffix = ".".join(labels[cut:])
        if suffix in _PUBLIC_SUFFIXES and all(_is_wild_only(lab) for lab in labels[:cut]):
            raise ValueError(
                f"must name a domain under '.{suffix}', not only wildcards "
                f"(e.g. *.example.{suffix})"
            )
    return name


def _label_rank(label: str) -> int:
    if label == "**":
        return 4
    if label == "*":
        return 3
    if "*" in label:
        return 2
    if "?" in label:
        return 1
    return 0


_END_RANK = 5  # a pattern that ends here is less specific than one with more labels


def _label_regex(label: str) -> str:
    out = []
    for ch in label:
        if ch == "*":
            out.append("[^.]*")
        elif ch == "?":
            out.append("[^.]")
        else:
            out.append(re.escape(ch))
    return "".join(out)


class Pattern:
    """A compiled DNS pattern; build it with :func:`compile_pattern`."""

    __slots__ = ("_exact", "_regex", "_suffix", "anchor", "is_wildcard", "sort_key", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        labels = text.split(".")
        self.is_wildcard = "*" in text or "?" in text
        ranks = tuple((_label_rank(lab), lab) for lab in reversed(labels))
        self.sort_key: tuple[object, ...] = (
            self.is_wildcard,
            ranks + ((_END_RANK, ""),),
            text,
        )
        # The longest wildcard-free suffix: every name the pattern matches ends with it.
        concrete: list[str] = []
        for lab in reversed(labels):
            if "*" in lab or "?" in lab:
                break
            concrete.append(lab)
        self.anchor = ".".join(reversed(concrete))
        self._exact: str | None = None if self.is_wildcard else text
        self._suffix: str | None = None
        self._regex: re.Pattern[str] | None = None
        if not self.is_wildcard:
            return
        rest = labels[1:]
        if labels[0] in ("*", "**") and not any("*" in lab or "?" in lab for lab in rest):
            # The common forms `*.zone` / `**.zone` get a regex-free fast path.
            self._suffix = ".".join(rest)
        parts: list[str] = []
        for i, label in enumerate(labels):
            last = i == len(labels) - 1
            if label == "**":
                parts.append(r"(?:[^.]+\.)*")
            elif label == "*" and i == 0:
                parts.append(r"(?:[^.]+\.)?")
            else:
                parts.append(_label_regex(label) if label != "*" else "[^.]+")
                if not last:
                    parts.append(r"\.")
        self._regex = re.compile("".join(parts))

    def matches(self, name: str) -> bool:
        """Return whether the query ``name`` matches (case-insensitive, trailing dot ignored)."""
        name = normalize_name(name)
        if self._exact is not None:
            return name == self._exact
        suffix = self._suffix
        if suffix is not None:
            if name == suffix:
                return True
            if not name.endswith(suffix) or name[-len(suffix) - 1 : -len(suffix)] != ".":
                return False
            head = name[: -len(suffix) - 1]
            if "" in head.split("."):
                return False
            return self.text[1] == "*" or "." not in head
        assert self._regex is not None
        return self._regex.fullmatch(name) is not None

    def __lt__(self, other: Pattern) -> bool:
        return self.sort_key < other.sort_key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pattern) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return f"Pattern({self.text!r})"


def compile_pattern(p: str) -> Pattern:
    """Validate and compile a pattern (raises ``ValueError`` like :func:`validate_pattern`)."""
    return Pattern(validate_pattern(p))


def best_match(name: str, patterns: Iterable[tuple[Pattern, T]]) -> T | None:
    """Return the value of the most specific pattern matching ``name``, or ``None``."""
    name = normalize_name(name)
    best: tuple[object, ...] | None = None
    best_value: T | None = None
    for pattern, value in patterns:
        if pattern._exact is not None:
            if pattern._exact == name:
                return value
            continue
        if (best is None or pattern.sort_key < best) and pattern.matches(name):
            best = pattern.sort_key
            best_value = value
    return best_value


class PatternTable(Generic[T]):
    """Patterns with values, indexed for lookups by name (the DNS stub's resource table).

    Exact names sit in a dict; wildcard patterns are bucketed by their wildcard-free suffix
    (:attr:`Pattern.anchor`), so a lookup only tests the patterns anchored at one of the name's
    suffixes. :meth:`lookup` returns the same value as :func:`best_match` over all entries.
    Inserting a pattern that is already present replaces its value.
    """

    __slots__ = ("_buckets", "_exact")

    def __init__(self) -> None:
        self._exact: dict[str, T] = {}
        self._buckets: dict[str, dict[str, tuple[Pattern, T]]] = {}

    def insert(self, pattern: Pattern | str, value: T) -> None:
        p = pattern if isinstance(pattern, Pattern) else compile_pattern(pattern)
        if p._exact is not None:
            self._exact[p._exact] = value
        else:
            self._buckets.setdefault(p.anchor, {})[p.text] = (p, value)

    def remove(self, pattern: Pattern | str) -> bool:
        """Remove a pattern; return whether it was present."""
        p = pattern if isinstance(pattern, Pattern) else compile_pattern(pattern)
        if p._exact is not None:
            return self._exact.pop(p._exact, _MISSING) is not _MISSING
        bucket = self._buckets.get(p.anchor)
        if bucket is None or bucket.pop(p.text, None) is None:
            return False
        if not bucket:
            del self._buckets[p.anchor]
        return True

    def __len__(self) -> int:
        return len(self._exact) + sum(len(b) for b in self._buckets.values())

    def lookup(self, name: str) -> T | None:
        """Return the value of the most specific pattern matching ``name``, or ``None``."""
        name = normalize_name(name)
        if name in self._exact:
            return self._exact[name]
        if not self._buckets:
            return None
        best: tuple[object, ...] | None = None
        best_value: T | None = None
        suffix = name
        while True:
            bucket = self._buckets.get(suffix)
            if bucket is not None:
                for p, value in bucket.values():
                    if (best is None or p.sort_key < best) and p.matches(name):
                        best = p.sort_key
                        best_value = value
            dot = suffix.find(".")
            if dot < 0:
                return best_value
            suffix = suffix[dot + 1 :]


_MISSING = object()
