"""A virtual monotonic clock for simulations: time moves only when the test moves it."""

from __future__ import annotations

from collections.abc import Iterable


class VirtualClock:
    """Seconds as a float, starting at ``start``; never goes backwards."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def advance_to(self, t: float) -> float:
        """Move to ``t`` (no-op when ``t`` is in the past); return the new time."""
        self.now = max(self.now, t)
        return self.now

    def advance(self, dt: float) -> float:
        """Move forward by ``dt`` seconds."""
        if dt < 0:
            raise ValueError("time cannot go backwards")
        self.now += dt
        return self.now

    def advance_to_next(
        self, deadlines: Iterable[float | None], limit: float | None = None
    ) -> float | None:
        """Advance to the earliest non-None deadline (capped at ``limit``); None when there is none."""
        candidates = [d for d in deadlines if d is not None]
        if limit is not None:
            candidates.append(limit)
        if not candidates:
            return None
        return self.advance_to(min(candidates))
