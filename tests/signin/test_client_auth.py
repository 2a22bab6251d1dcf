"""The client-side helpers of browser sign-in (no I/O)."""

from __future__ import annotations

import urllib.parse

import pytest

from firezone import client_auth
from firezone.portal import tokens
from firezone.portal.web.oidc import pkce_challenge

FRAGMENT = ".0b6c3c0e-7f58-4a52-9f47-1e8f4c0c9c11.abcdef234567"


def _cb(**over: str) -> str:
    args = {"fragment": FRAGMENT, "actor_name": "Ann Lee", "account_slug": "acme", "account_name": "Acme & Co",
            "state": "s" * 64, "provider_identifier": "p1"}
    args.update(over)
    return client_auth.callback_url(**args)


def test_sign_in_url_carries_kind_state_and_nonce() -> None:
    url = client_auth.sign_in_url("https://portal.test/", "acme", state="st", nonce="no")
    parts = urllib.parse.urlsplit(url)
    assert parts.path == "/acme"
    assert urllib.parse.parse_qs(parts.query) == {"as": ["client"], "state": ["st"], "nonce": ["no"]}
    with pytest.raises(ValueError):
        client_auth.sign_in_url("https://portal.test", "acme", state="s", nonce="n", as_="admin")


def test_random_values_are_32_bytes_and_fresh() -> None:
    a, b = client_auth.random_hex(), client_auth.random_hex()
    assert len(a) == 64 and a != b and int(a, 16) >= 0


def test_callback_round_trip() -> None:
    cb = client_auth.parse_callback(_cb())
    assert cb.fragment == FRAGMENT and cb.actor_name == "Ann Lee" and cb.account_name == "Acme & Co"
    assert cb.state == "s" * 64 and cb.account_slug == "acme" and cb.provider_identifier == "p1"


@pytest.mark.parametrize(("url", "words"), [
    ("", "empty"),
    ("https://portal.test/?fragment=x", "not a sign-in callback"),
    ("firezone-fd0020211111://other?fragment=x", "not a sign-in callback"),
    (_cb(fragment="nonce" + FRAGMENT), "no valid token fragment"),
    (_cb(fragment=".not-a-uuid.abc"), "no valid token fragment"),
    (_cb(state=""), "lacks 'state'"),
    (_cb() + "&state=again", "more than once"),
    ("firezone-fd0020211111://handle_client_sign_in_callback?" + "a=" + "x" * 9000, "too long"),
])
def test_bad_callbacks_are_rejected_with_a_reason(url: str, words: str) -> None:
    with pytest.raises(client_auth.CallbackError, match=words):
        client_auth.parse_callback(url)


def test_state_comparison() -> None:
    assert client_auth.state_matches("abc", "abc")
    assert not client_auth.state_matches("abc", "abd")
    assert not client_auth.state_matches("abc", "")


def test_assembled_token_is_what_the_portal_minted() -> None:
    sec = tokens.mint("n" * 64)
    token = client_auth.assemble_token("n" * 64, sec.fragment)
    assert token == sec.encoded
    parsed = tokens.parse(token)
    assert parsed is not None and tokens.matches(parsed, sec.salt, sec.hash)
    wrong = tokens.parse(client_auth.assemble_token("m" * 64, sec.fragment))
    assert wrong is not None and not tokens.matches(wrong, sec.salt, sec.hash)


def test_pkce_challenge_matches_rfc7636_appendix_b() -> None:
    assert pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk") == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
