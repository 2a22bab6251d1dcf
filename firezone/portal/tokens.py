"""Token secrets: ``<nonce>.<token id>.<secret>``; only a salted SHA3-256 hash is stored.

Client tokens minted at sign-in are bound to the client's nonce: the callback URL carries only
``.<id>.<secret>`` (the "fragment"), and the client prefixes the nonce it generated. An app that
intercepts the callback therefore holds nothing usable. Tokens made by admins have an empty nonce, so
their text starts with a dot.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass


@dataclass(frozen=True)
class Secret:
    id: str
    nonce: str
    secret: str
    salt: str
    hash: str

    @property
    def fragment(self) -> str:
        return f".{self.id}.{self.secret}"

    @property
    def encoded(self) -> str:
        return f"{self.nonce}{self.fragment}"


def hash_secret(nonce: str, secret: str, salt: str) -> str:
    return hashlib.sha3_256(f"{nonce}{secret}{salt}".encode()).hexdigest()


def mint(nonce: str = "") -> Secret:
    tid = str(uuid.uuid4())
    secret = base64.b32encode(secrets.token_bytes(32)).decode().rstrip("=").lower()
    salt = base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("=")
    return Secret(tid, nonce, secret, salt, hash_secret(nonce, secret, salt))


@dataclass(frozen=True)
class Parsed:
    nonce: str
    id: str
    secret: str


def parse(encoded: str) -> Parsed | None:
    """Split a presented token; None when it cannot be one of ours."""
    if not isinstance(encoded, str) or len(encoded) > 512:
        return None
    parts = encoded.strip().rsplit(".", 2)
    if len(parts) != 3:
        return None
    nonce, tid, secret = parts
    try:
        uuid.UUID(tid)
    except ValueError:
        return None
    if not secret or not secret.isalnum():
        return None
    return Parsed(nonce, tid, secret)


def matches(parsed: Parsed, salt: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(parsed.nonce, parsed.secret, salt), stored_hash)
