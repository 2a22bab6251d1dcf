"""MAC1/MAC2, cookie replies and the under-load rate limiter (whitepaper §5.3, §5.4.4, §5.4.7).

Theory of operation
-------------------
Every handshake message ends in ``mac1 ‖ mac2``. mac1 proves the sender knows the receiver's
public key and is always checked first (it is cheap and keyed per receiver). mac2 is all zeros
unless the sender holds a *cookie* from the receiver.

A responder that is *under load* (more than ``limit_per_second`` handshake messages in the
current second) stops doing Diffie-Hellman for messages whose mac2 is missing or wrong. It answers
them with a cookie reply instead:

    τ = MAC(Rm, Am)                 Rm: random secret rotated every 2 minutes, Am: source address
    msg.cookie = XAEAD(HASH(LABEL_COOKIE ‖ Spub_m), nonce, τ, msg.mac1)

The initiator stores τ (:class:`CookieJar`) and puts ``mac2 = MAC(τ, msg[0:off(mac2)])`` on its
next handshake messages for two minutes, which proves it can receive at its source address.
Under load, messages with a valid mac2 are still limited per source IP (a token bucket of
PER_SOURCE_RATE per second, PER_SOURCE_BURST deep, as wireguard-go does).
"""

from __future__ import annotations

import hmac
import ipaddress
import struct

from firezone.proto.rng import Rng

from .crypto import LABEL_COOKIE, LABEL_MAC1, InvalidTag, hash_, mac, xaead_decrypt, xaead_encrypt
from .messages import _COOKIE, COOKIE_REPLY_LEN, MSG_COOKIE_REPLY
from .timers import COOKIE_REFRESH_TIME

__all__ = [
    "RATE_LIMITED",
    "CookieJar",
    "RateLimiter",
    "address_bytes",
    "verify_mac1",
]

_U32 = struct.Struct("<I")

# RateLimiter.check() verdict: drop the message and send nothing.
RATE_LIMITED = b""


def _ip_bytes(host: str) -> bytes:
    try:
        return ipaddress.ip_address(host).packed
    except ValueError:
        return host.encode("utf-8", "replace")


def address_bytes(src: tuple[str, int] | None) -> bytes:
    """Am: the packed IP address followed by the big-endian UDP port (empty if unknown)."""
    if src is None:
        return b""
    return _ip_bytes(str(src[0])) + (int(src[1]) & 0xFFFF).to_bytes(2, "big")


def verify_mac1(mac1_key: bytes, msg: bytes) -> bool:
    """Check ``msg.mac1 = MAC(HASH(LABEL_MAC1 ‖ Spub_m), msg[0:off(mac1)])``."""
    off = len(msg) - 32
    return hmac.compare_digest(mac(mac1_key, msg[:off]), msg[off : off + 16])


class CookieJar:
    """The sender side of mac1/mac2: our last mac1 and the cookie the peer gave us."""

    __slots__ = ("_cookie", "_cookie_at", "last_mac1")

    def __init__(self) -> None:
        self._cookie: bytes | None = None
        self._cookie_at = 0.0
        self.last_mac1: bytes | None = None

    def has_cookie(self, now: float) -> bool:
        return self._cookie is not None and now - self._cookie_at < COOKIE_REFRESH_TIME

    def add_macs(self, mac1_key: bytes, msg: bytes, now: float) -> bytes:
        """Fill in mac1 and (with a fresh cookie) mac2 of a handshake message."""
        off = len(msg) - 32
        body = msg[:off]
        # msg.mac1 = MAC(HASH(LABEL_MAC1 ‖ Spub_m'), msg[0:off(mac1)])
        m1 = mac(mac1_key, body)
        self.last_mac1 = m1
        body += m1
        # msg.mac2 = MAC(τ, msg[0:off(mac2)]) if a cookie is fresh, else 0^16
        if self._cookie is not None and now - self._cookie_at < COOKIE_REFRESH_TIME:
            return body + mac(self._cookie, body)
        return body + bytes(16)

    def consume_reply(self, cookie_key: bytes, reply: bytes, now: float) -> bool:
        """Open a cookie reply sent in answer to our last handshake message."""
        if len(reply) != COOKIE_REPLY_LEN or self.last_mac1 is None:
            return False
        _, _receiver, nonce, enc = _COOKIE.unpack(reply)
        try:
            # τ = XAEAD-Open(HASH(LABEL_COOKIE ‖ Spub_m), msg.nonce, msg.cookie, last mac1)
            tau = xaead_decrypt(cookie_key, nonce, enc, self.last_mac1)
        except InvalidTag:
            return False
        self._cookie = tau
        self._cookie_at = now
        return True


class RateLimiter:
    """Counts handshake messages per second for one static key; under load it demands cookies."""

    # Whitepaper §5.4.7: Rm changes every two minutes.
    SECRET_LIFETIME = 120.0
    # wireguard-go ratelimiter.go: 20 handshakes per second per source IP, burst of 5.
    PER_SOURCE_RATE = 20.0
    PER_SOURCE_BURST = 5.0
    _MAX_SOURCES = 4096

    def __init__(self, *, static_public: bytes, rng: Rng, limit_per_second: int = 100) -> None:
        if len(static_public) != 32:
            raise ValueError("static public key must be 32 bytes")
        if limit_per_second < 0:
            raise ValueError("limit_per_second must be >= 0")
        self._rng = rng
        self.limit_per_second = limit_per_second
        self.mac1_key = hash_(LABEL_MAC1 + static_public)
        self._cookie_key = hash_(LABEL_COOKIE + static_public)
        self._secret = rng.token_bytes(32)
        self._secret_at: float | None = None
        self._window_start: float | None = None
        self._count = 0
        self._buckets: dict[bytes, tuple[float, float]] = {}  # ip -> (tokens, last refill)
        self.cookies_sent = 0
        self.rate_limited = 0

    def handle_timeout(self, now: float) -> None:
        """Start a new one-second counting window and rotate Rm when due."""
        if self._window_start is None or now - self._window_start >= 1.0:
            self._window_start = now
            self._count = 0
            if len(self._buckets) > self._MAX_SOURCES:
                self._buckets.clear()
        if self._secret_at is None:
            self._secret_at = now
        elif now - self._secret_at >= self.SECRET_LIFETIME:
            self._secret = self._rng.token_bytes(32)
            self._secret_at = now

    def poll_timeout(self) -> float | None:
        if self._count and self._window_start is not None:
            return self._window_start + 1.0
        return None

    def is_under_load(self, now: float) -> bool:
        self.handle_timeout(now)
        return self._count >= self.limit_per_second

    def cookie(self, src: bytes) -> bytes:
        """τ = MAC(Rm, Am)."""
        return mac(self._secret, src)

    def check(self, msg: bytes, src: tuple[str, int] | None, now: float) -> bytes | None:
        """Account one handshake message whose mac1 already verified.

        Returns None if it may be processed, the cookie reply to send back to ``src`` if it
        needs a (new) cookie, or RATE_LIMITED (empty bytes) if it must be dropped silently.
        """
        self.handle_timeout(now)
        under_load = self._count >= self.limit_per_second
        self._count += 1
        if not under_load:
            return None
        am = address_bytes(src)
        tau = self.cookie(am)
        off = len(msg) - 16
        if not hmac.compare_digest(mac(tau, msg[:off]), msg[off:]):
            return self.make_reply(msg, tau)
        ip = am[:-2]
        tokens, last = self._buckets.get(ip, (self.PER_SOURCE_BURST, now))
        tokens = min(self.PER_SOURCE_BURST, tokens + (now - last) * self.PER_SOURCE_RATE)
        if tokens < 1.0:
            self._buckets[ip] = (tokens, now)
            self.rate_limited += 1
            return RATE_LIMITED
        self._buckets[ip] = (tokens - 1.0, now)
        return None

    def make_reply(self, msg: bytes, tau: bytes) -> bytes:
        """Build a cookie reply (type 3) to the handshake message ``msg``."""
        receiver = _U32.unpack_from(msg, 4)[0]  # the sender index of msg
        mac1 = msg[len(msg) - 32 : len(msg) - 16]
        nonce = self._rng.token_bytes(24)
        # msg.cookie = XAEAD(HASH(LABEL_COOKIE ‖ Spub_m), msg.nonce, τ, mac1 of the message)
        enc = xaead_encrypt(self._cookie_key, nonce, tau, mac1)
        self.cookies_sent += 1
        return _COOKIE.pack(MSG_COOKIE_REPLY, receiver, nonce, enc)
