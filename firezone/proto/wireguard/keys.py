"""Curve25519 key helpers with the same conventions as ``wg genkey`` / ``wg pubkey``."""

from __future__ import annotations

import base64
import binascii

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from firezone.proto.rng import Rng

KEY_LEN = 32


def clamp(key: bytes) -> bytes:
    """Clamp 32 bytes into a Curve25519 scalar (RFC 7748 §5), as ``wg genkey`` does."""
    if len(key) != KEY_LEN:
        raise ValueError(f"a WireGuard key is 32 bytes, got {len(key)}")
    b = bytearray(key)
    b[0] &= 248
    b[31] &= 127
    b[31] |= 64
    return bytes(b)


def generate_private_key(rng: Rng) -> bytes:
    """Return a new clamped X25519 private key drawn from ``rng``."""
    return clamp(rng.token_bytes(KEY_LEN))


def public_key(private: bytes) -> bytes:
    """Return the X25519 public key for ``private``."""
    if len(private) != KEY_LEN:
        raise ValueError(f"a WireGuard key is 32 bytes, got {len(private)}")
    return (
        X25519PrivateKey.from_private_bytes(private)
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw)
    )


def b64encode_key(b: bytes) -> str:
    """Encode a 32-byte key as the 44-character base64 text ``wg`` prints."""
    if len(b) != KEY_LEN:
        raise ValueError(f"a WireGuard key is 32 bytes, got {len(b)}")
    return base64.b64encode(b).decode("ascii")


def b64decode_key(s: str) -> bytes:
    """Decode a base64 WireGuard key; raises ValueError with a clear message."""
    text = s.strip()
    if len(text) != 44 or not text.endswith("="):
        raise ValueError("a WireGuard key is 44 base64 characters ending in '='")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a WireGuard key must be valid base64") from None
    if len(raw) != KEY_LEN:
        raise ValueError(f"a WireGuard key is 32 bytes, got {len(raw)}")
    return raw
