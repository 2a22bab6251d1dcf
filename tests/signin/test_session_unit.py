"""Cookie and CSRF helpers of the portal pages (no server)."""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from firezone.portal.web import session as sess
from firezone.portal.web.signin import CODE_ALPHABET, CODE_LENGTH, new_code, normalize_code


def _cookie(external_url: str | None) -> str:
    resp = web.Response()
    sess.set_cookie(resp, make_mocked_request("GET", "/acme"), sess.SESSION_COOKIE, "id.secret", max_age=60,
                    external_url=external_url)
    return resp.cookies[sess.SESSION_COOKIE].OutputString()


def test_cookie_is_httponly_lax_and_secure_only_under_tls() -> None:
    plain = _cookie(None)
    assert "HttpOnly" in plain and "SameSite=Lax" in plain and "Secure" not in plain
    assert "Secure" in _cookie("https://portal.example.com")


def test_csrf_token_is_bound_to_the_session_secret() -> None:
    a, b = sess.session_csrf("secret-a"), sess.session_csrf("secret-b")
    assert a != b and len(a) == 64
    assert sess.check_csrf(a, a)
    assert not sess.check_csrf(a, b)
    assert not sess.check_csrf(a, None)
    assert not sess.check_csrf(None, a)
    assert not sess.check_csrf("", "")


def test_cookie_values_are_split_safely() -> None:
    assert sess.split_cookie("abc.def") == ("abc", "def")
    assert sess.split_cookie("abc.de.f") == ("abc", "de.f")
    for bad in (None, "", "nodot", ".x", "x.", "a." + "b" * 300):
        assert sess.split_cookie(bad) is None


def test_codes_avoid_look_alikes_and_normalize() -> None:
    codes = {new_code() for _ in range(200)}
    assert len(codes) == 200
    assert all(len(c) == CODE_LENGTH and set(c) <= set(CODE_ALPHABET) for c in codes)
    assert not set("il1o0") & set(CODE_ALPHABET)
    assert normalize_code(" AB-cd 23\n") == "abcd23"
