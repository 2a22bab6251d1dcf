"""TURN credential derivation shared by portal and relay."""

from __future__ import annotations

import base64
import hashlib

import pytest

from firezone.proto.turn.credentials import (
    REALM,
    is_expired,
    make_credentials,
    parse_username,
    password_for,
    salt_for,
    secret_text,
)

SECRET = bytes(range(32))
PUBKEY = "Xy3HGUo+Kd4+sMGqu+Fb7l5j3n2/5MpJwLZT0xFkW2E="


def b64_nopad(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def test_known_answer() -> None:
    username, password = make_credentials(SECRET, PUBKEY, 1_900_000_000)
    salt = b64_nopad(hashlib.sha256(PUBKEY.encode()).digest())
    assert username == f"1900000000:{salt}"
    assert "=" not in username and "=" not in password
    material = f"1900000000:{SECRET.hex()}:{salt}".encode()
    assert password == b64_nopad(hashlib.sha256(material).digest())
    assert REALM == "firezone"


def test_secret_text_is_lowercase_hex_of_the_bytes() -> None:
    assert secret_text(SECRET) == SECRET.hex()
    assert secret_text(b"\xab" * 32) == "ab" * 32
    assert secret_text("already-text") == "already-text"
    # The portal, holding the hex text from JSON, derives the same credentials as the relay.
    assert make_credentials(SECRET.hex(), PUBKEY, 5) == make_credentials(SECRET, PUBKEY, 5)


def test_password_for_recomputes_from_the_username() -> None:
    username, password = make_credentials(SECRET, PUBKEY, 1_900_000_000)
    assert password_for(SECRET, username) == password
    assert password_for(b"\x00" * 32, username) != password
    other_user, _ = make_credentials(SECRET, "b3RoZXI=", 1_900_000_000)
    assert password_for(SECRET, other_user) != password


def test_salt_depends_on_the_public_key_text() -> None:
    assert salt_for(PUBKEY) != salt_for("b3RoZXI=")
    assert len(salt_for(PUBKEY)) == 43  # 32 bytes, unpadded base64


@pytest.mark.parametrize("bad", ["", "123", ":salt", "12a:salt", "123:", "-5:salt", "١٢٣:salt"])
def test_malformed_usernames(bad: str) -> None:
    with pytest.raises(ValueError, match="TURN username must be"):
        parse_username(bad)
    with pytest.raises(ValueError):
        password_for(SECRET, bad)
    assert is_expired(bad, 0)


def test_expiry() -> None:
    username, _ = make_credentials(SECRET, PUBKEY, 1000)
    assert parse_username(username) == (1000, salt_for(PUBKEY))
    assert not is_expired(username, 999.5)
    assert not is_expired(username, 1000)
    assert is_expired(username, 1000.5)


def test_negative_expiry_is_refused() -> None:
    with pytest.raises(ValueError):
        make_credentials(SECRET, PUBKEY, -1)
