"""The production :class:`firezone.proto.rng.Rng`, backed by the OS CSPRNG."""

from __future__ import annotations

import secrets


class SystemRng:
    def token_bytes(self, n: int) -> bytes:
        return secrets.token_bytes(n)

    def randbelow(self, n: int) -> int:
        return secrets.randbelow(n)

    def random(self) -> float:
        return secrets.randbits(53) / (1 << 53)


SYSTEM_RNG = SystemRng()
