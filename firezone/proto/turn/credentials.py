"""TURN REST-style credentials shared by the portal (which mints them) and the relay (which checks).

Scheme (after Firezone)::

    salt     = b64(SHA-256(<peer public key as its base64 text>))      no "=" padding
    username = "<expiry_unix>:<salt>"
    password = b64(SHA-256("<expiry_unix>:<relay secret text>:<salt>"))  no "=" padding
    realm    = "firezone"

The relay's secret is 32 random bytes. Its text form, which is what the portal receives over JSON
and what goes into the password hash, is **lowercase hex** (64 characters): one unambiguous
spelling, with no alphabet or padding variants that could make the portal and the relay hash
different strings. :func:`secret_text` turns either form into that text.

The relay needs no state per user: it recomputes the password from the USERNAME it receives.
"""

from __future__ import annotations

import base64
import hashlib

REALM = "firezone"
SECRET_BYTES = 32


def _b64_nopad(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def secret_text(secret: bytes | str) -> str:
    """The relay secret as the text that is hashed: raw bytes become lowercase hex, text stays."""
    if isinstance(secret, str):
        return secret
    return bytes(secret).hex()


def salt_for(public_key_b64: str) -> str:
    """Salt of a peer: unpadded base64 of SHA-256 over its public key's base64 text."""
    return _b64_nopad(hashlib.sha256(public_key_b64.encode("ascii")).digest())


def parse_username(username: str) -> tuple[int, str]:
    """Split ``"<expiry_unix>:<salt>"``; raise ``ValueError`` when malformed."""
    expiry, sep, salt = username.partition(":")
    if not sep or not expiry.isascii() or not expiry.isdigit() or not salt:
        raise ValueError("TURN username must be '<expiry_unix>:<salt>'")
    return int(expiry), salt


def _password(secret: bytes | str, expiry: str, salt: str) -> str:
    material = f"{expiry}:{secret_text(secret)}:{salt}".encode()
    return _b64_nopad(hashlib.sha256(material).digest())


def password_for(secret: bytes | str, username: str) -> str:
    """Password the relay expects for ``username`` (raises ``ValueError`` for a bad username)."""
    parse_username(username)
    expiry, _, salt = username.partition(":")
    return _password(secret, expiry, salt)


def make_credentials(
    secret: bytes | str, public_key_b64: str, expires_unix: int
) -> tuple[str, str]:
    """Mint ``(username, password)`` for the peer with ``public_key_b64``, valid until the expiry."""
    if expires_unix < 0:
        raise ValueError("expires_unix must not be negative")
    salt = salt_for(public_key_b64)
    expiry = str(int(expires_unix))
    return f"{expiry}:{salt}", _password(secret, expiry, salt)


def is_expired(username: str, unix_now: float) -> bool:
    """True when the username's expiry has passed (or it is malformed)."""
    try:
        expiry, _ = parse_username(username)
    except ValueError:
        return True
    return expiry < unix_now
