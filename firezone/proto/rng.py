"""Randomness for sans-IO machines: injected, so simulations replay bit for bit."""

from __future__ import annotations

import hashlib
from typing import Protocol


class Rng(Protocol):
    """The source of randomness every machine under ``firezone.proto`` takes."""

    def token_bytes(self, n: int) -> bytes:
        """Return ``n`` random bytes."""

    def randbelow(self, n: int) -> int:
        """Return a random int in ``[0, n)``."""

    def random(self) -> float:
        """Return a random float in ``[0.0, 1.0)``."""


class SeededRng:
    """A deterministic :class:`Rng` for tests and simulations (SHA-256 in counter mode)."""

    def __init__(self, seed: int | str | bytes = 0) -> None:
        if isinstance(seed, int):
            seed = seed.to_bytes(16, "big", signed=True)
        elif isinstance(seed, str):
            seed = seed.encode()
        self._key = hashlib.sha256(b"fz-seeded-rng:" + seed).digest()
        self._counter = 0
        self._buf = b""

    def token_bytes(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._buf += hashlib.sha256(self._key + self._counter.to_bytes(8, "big")).digest()
            self._counter += 1
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def randbelow(self, n: int) -> int:
        if n <= 0:
            raise ValueError("randbelow() needs a positive bound")
        k = max(1, (n.bit_length() + 7) // 8 + 1)
        limit = (256**k // n) * n
        while True:
            v = int.from_bytes(self.token_bytes(k), "big")
            if v < limit:
                return v % n

    def random(self) -> float:
        return (int.from_bytes(self.token_bytes(7), "big") >> 3) / (1 << 53)
