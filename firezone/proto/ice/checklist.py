"""Candidate pairs, their ordering and states, and the retransmission schedule (RFC 8445 §6.1.2)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .candidate import Addr, Candidate, pair_priority

# RFC 8445 §14.2: Ta, the pacing interval between new checks.
TA = 0.050


class PairState(enum.Enum):
    FROZEN = "frozen"
    WAITING = "waiting"
    IN_PROGRESS = "in-progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


def rto_schedule(initial: float, maximum: float, attempts: int) -> list[float]:
    """Wait after each attempt: ``initial`` doubling up to ``maximum`` (0.25, 0.5, 1, 1.5, ...)."""
    out, rto = [], initial
    for _ in range(attempts):
        out.append(min(rto, maximum))
        rto *= 2
    return out


@dataclass(slots=True)
class Pair:
    """A local base (host or relay candidate) and a remote candidate, plus its check state."""

    local: Candidate
    remote: Candidate
    priority: int
    state: PairState = PairState.FROZEN
    nominated: bool = False
    nominate_on_success: bool = False  # controlled: USE-CANDIDATE seen before the pair was valid
    rtt: float | None = None
    mapped: Addr | None = None  # our address as the remote saw it (XOR-MAPPED-ADDRESS)
    last_response: float | None = None
    succeeded_at: float | None = None
    order: int = 0  # tie-break for equal priorities: creation order

    @property
    def foundation(self) -> tuple[str, str]:
        return (self.local.foundation, self.remote.foundation)

    @property
    def key(self) -> tuple[Addr, Addr]:
        return (self.local.base, self.remote.addr)

    def sort_key(self) -> tuple[int, int]:
        return (-self.priority, self.order)


def compute_pair_priority(local: Candidate, remote: Candidate, controlling: bool) -> int:
    """Pair priority from our role: G is the controlling agent's candidate priority."""
    if controlling:
        return pair_priority(local.priority, remote.priority)
    return pair_priority(remote.priority, local.priority)


class CheckList:
    """The ordered pairs of one component (RFC 8445 §6.1.2.2 - §6.1.2.6)."""

    def __init__(self) -> None:
        self.pairs: list[Pair] = []
        self._by_key: dict[tuple[Addr, Addr], Pair] = {}
        self._order = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def get(self, local_base: Addr, remote: Addr) -> Pair | None:
        return self._by_key.get((local_base, remote))

    def add(self, local: Candidate, remote: Candidate, controlling: bool) -> Pair | None:
        """Add a pair unless redundant (§6.1.2.4: same base and remote keeps the higher priority)."""
        if not local.same_transport(remote):
            return None
        prio = compute_pair_priority(local, remote, controlling)
        existing = self._by_key.get((local.base, remote.addr))
        if existing is not None:
            if prio > existing.priority and existing.state in (PairState.FROZEN, PairState.WAITING):
                existing.local, existing.remote, existing.priority = local, remote, prio
                self._sort()
            return None
        self._order += 1
        pair = Pair(local, remote, prio, order=self._order)
        # §6.1.2.6: a pair starts Waiting unless another pair with its foundation is already active.
        if not any(
            p.foundation == pair.foundation and p.state != PairState.FAILED for p in self.pairs
        ):
            pair.state = PairState.WAITING
        self.pairs.append(pair)
        self._by_key[pair.key] = pair
        self._sort()
        return pair

    def remove_local(self, base: Addr) -> list[Pair]:
        gone = [p for p in self.pairs if p.local.base == base]
        for p in gone:
            self.pairs.remove(p)
            del self._by_key[p.key]
        return gone

    def recompute_priorities(self, controlling: bool) -> None:
        """§7.3.1.1: after a role switch every pair priority changes."""
        for p in self.pairs:
            p.priority = compute_pair_priority(p.local, p.remote, controlling)
        self._sort()

    def _sort(self) -> None:
        self.pairs.sort(key=Pair.sort_key)

    def next_waiting(self) -> Pair | None:
        """The highest-priority Waiting pair; unfreezes the best Frozen one when none waits."""
        for p in self.pairs:
            if p.state == PairState.WAITING:
                return p
        for p in self.pairs:
            if p.state == PairState.FROZEN:
                p.state = PairState.WAITING
                return p
        return None

    def unfreeze_foundation(self, foundation: tuple[str, str]) -> None:
        """§7.2.5.3.3: a success unfreezes the pairs sharing its foundation."""
        for p in self.pairs:
            if p.state == PairState.FROZEN and p.foundation == foundation:
                p.state = PairState.WAITING

    def valid(self) -> list[Pair]:
        """Succeeded pairs, best first."""
        return [p for p in self.pairs if p.state == PairState.SUCCEEDED]

    def all_failed(self) -> bool:
        return bool(self.pairs) and all(p.state == PairState.FAILED for p in self.pairs)

    def clear(self) -> None:
        self.pairs.clear()
        self._by_key.clear()
