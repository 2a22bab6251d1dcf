"""One set of transport keys (whitepaper §5.4.6) and its anti-replay window.

A :class:`Session` is created when a handshake completes. It owns one ChaCha20Poly1305 object per
direction (built once, so the data path only pays for the AEAD itself), the send counter and a
sliding replay window over received counters.

The replay window is RFC 6479's: a ring of REPLAY_BLOCKS 64-bit words, bit ``c & 63`` of word
``(c >> 6) % REPLAY_BLOCKS`` meaning "counter c was received". Moving the window clears whole
words, so the in-order path is a few small-int operations. A counter is accepted if it is newer
than the highest seen, or within REPLAY_WINDOW of it and not yet seen. The window only advances
after the AEAD tag checks, so a forged counter cannot move it.
"""

from __future__ import annotations

import struct

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from .timers import REJECT_AFTER_TIME, REKEY_AFTER_TIME, REKEY_ON_RECEIVE_AFTER

# RFC 6479 §2: one block is kept as slack, so the usable window is (blocks - 1) * 64 = 8128
# counters, the same as wireguard-go.
REPLAY_BLOCKS = 128
REPLAY_BLOCK_MASK = REPLAY_BLOCKS - 1
REPLAY_WINDOW = (REPLAY_BLOCKS - 1) * 64

# Whitepaper §5.4.6: nonce = 32 zero bits ‖ 64-bit little-endian counter.
NONCE = struct.Struct("<4xQ")

_INF = float("inf")


class Session:
    """Transport keys for one completed handshake."""

    __slots__ = (
        "created",
        "is_initiator",
        "local_index",
        "recv_aead",
        "reject_at",
        "rekey_at",
        "rekey_on_rx_at",
        "remote_index",
        "rx_max",
        "rx_words",
        "send_aead",
        "send_counter",
    )

    def __init__(
        self,
        *,
        local_index: int,
        remote_index: int,
        send_key: bytes,
        recv_key: bytes,
        is_initiator: bool,
        now: float,
    ) -> None:
        self.local_index = local_index
        self.remote_index = remote_index
        self.send_aead = ChaCha20Poly1305(send_key)
        self.recv_aead = ChaCha20Poly1305(recv_key)
        self.send_counter = 0
        self.rx_max = -1
        self.rx_words = [0] * REPLAY_BLOCKS
        self.created = now
        self.is_initiator = is_initiator
        self.reject_at = now + REJECT_AFTER_TIME
        # Whitepaper §6.2: only the initiator of a session rekeys because of its age.
        self.rekey_at = now + REKEY_AFTER_TIME if is_initiator else _INF
        self.rekey_on_rx_at = now + REKEY_ON_RECEIVE_AFTER if is_initiator else _INF

    def replay_check(self, counter: int) -> bool:
        """True if ``counter`` may be accepted (not too old, not yet seen)."""
        mx = self.rx_max
        if counter > mx:
            return True
        if mx - counter >= REPLAY_WINDOW:
            return False
        return not (self.rx_words[(counter >> 6) & REPLAY_BLOCK_MASK] >> (counter & 63)) & 1

    def replay_mark(self, counter: int) -> None:
        """Record ``counter`` as received; call only after it authenticated."""
        mx = self.rx_max
        words = self.rx_words
        if counter > mx:
            top = mx >> 6
            d = (counter >> 6) - top
            if d:
                for i in range(1, min(d, REPLAY_BLOCKS) + 1):
                    words[(top + i) & REPLAY_BLOCK_MASK] = 0
            self.rx_max = counter
        words[(counter >> 6) & REPLAY_BLOCK_MASK] |= 1 << (counter & 63)

    def __repr__(self) -> str:
        return (
            f"Session(local_index={self.local_index:#x}, remote_index={self.remote_index:#x}, "
            f"initiator={self.is_initiator}, sent={self.send_counter}, rx_max={self.rx_max})"
        )
