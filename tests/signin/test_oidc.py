"""OIDC sign-in against a provider served by the test, whose ID tokens are broken on purpose."""

from __future__ import annotations

import secrets
import time
import urllib.parse
from collections.abc import Iterator

import pytest

from firezone import client_auth
from firezone.portal.web import oidc
from tests.signin.conftest import Browser, FakeOP, Page, Portal, client_url, session_of

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def provider_id(portal: Portal, fake_op: FakeOP) -> Iterator[str]:
    r = portal.fz("--json", "provider", "add", "oidc", "Fake", "--issuer", fake_op.issuer,
                  "--client-id", fake_op.client_id, "--client-secret", fake_op.client_secret)
    import json

    pid = json.loads(r.stdout)["id"]
    yield pid
    portal.fz("provider", "remove", "Fake")


@pytest.fixture(autouse=True)
def _good_mode(fake_op: FakeOP) -> Iterator[None]:
    fake_op.mode = "good"
    yield
    fake_op.mode = "good"


def _start(portal: Portal, provider_id: str, *, kind: str = "client") -> tuple[Browser, Page, str, str]:
    """Pick the provider on the sign-in page and follow the browser through the provider."""
    b = Browser(portal.url)
    url, state, nonce = client_url(portal, kind=kind)
    r = b.submit(b.get(url), f"oidc-{provider_id}")
    assert r.status == 303 and r.location and r.location.startswith(portal_op_prefix(r)), r.text
    to_op = b.get(r.location)  # the fake provider redirects straight back with a code
    assert to_op.status == 302, to_op.text
    back = b.get(to_op.location or "")
    return b, back, state, nonce


def portal_op_prefix(r: Page) -> str:
    return "http://127.0.0.1:"


def test_authorization_request_uses_pkce_state_and_nonce(portal: Portal, fake_op: FakeOP, provider_id: str) -> None:
    b = Browser(portal.url)
    url, _s, _n = client_url(portal)
    r = b.submit(b.get(url), f"oidc-{provider_id}")
    q = urllib.parse.parse_qs(urllib.parse.urlsplit(r.location or "").query)
    assert q["code_challenge_method"] == ["S256"] and len(q["code_challenge"][0]) == 43
    assert len(q["state"][0]) >= 43 and len(q["nonce"][0]) >= 43
    assert q["redirect_uri"] == [portal.url + "/auth/oidc/callback"]
    assert q["scope"] == ["openid email profile"]


def test_good_id_token_signs_an_existing_user_in(portal: Portal, fake_op: FakeOP, provider_id: str) -> None:
    fake_op.subject_email = portal.user()
    _b, page, state, nonce = _start(portal, provider_id)
    assert page.status == 200, page.text
    assert fake_op.token_requests[-1]["pkce_ok"]
    cb = client_auth.parse_callback(page.callback)
    assert cb.state == state
    code, data = session_of(portal, client_auth.assemble_token(nonce, cb.fragment))
    assert code == 200 and data["data"]["actor"]["email"] == fake_op.subject_email
    assert data["data"]["token"]["provider"] == "Fake"


@pytest.mark.parametrize(("mode", "words"), [
    ("wrong_aud", "issued for another application"),
    ("wrong_iss", "issued by 'http://127.0.0.1:1'"),
    ("wrong_nonce", "nonce mismatch"),
    ("expired", "has expired"),
    ("other_key", "signature does not verify"),
    ("unknown_kid", "signed by a key the identity provider does not publish"),
    ("unverified", "is not verified"),
    ("no_email", "the email claim is missing"),
])
def test_bad_id_tokens_are_refused_in_plain_words(portal: Portal, fake_op: FakeOP, provider_id: str,
                                                   mode: str, words: str) -> None:
    fake_op.subject_email = portal.user()
    fake_op.mode = mode
    b, page, _state, _nonce = _start(portal, provider_id)
    assert page.status == 401, page.text
    assert words in page.message, page.message
    assert "Fake" in page.message
    assert client_auth.SCHEME not in page.text
    assert b.cookie("fz_flow") is None


def test_rotated_signing_key_is_fetched_again(portal: Portal, fake_op: FakeOP, provider_id: str) -> None:
    fake_op.subject_email = portal.user()
    assert _start(portal, provider_id)[1].status == 200
    time.sleep(oidc.JWKS_MIN_REFRESH_S + 0.1)
    before = fake_op.jwks_fetches
    fake_op.rotate(f"k-{secrets.token_hex(3)}")
    _b, page, _s, _n = _start(portal, provider_id)
    assert page.status == 200, page.text
    assert fake_op.jwks_fetches == before + 1


def test_unknown_email_is_refused_unless_the_provider_creates_users(portal: Portal, fake_op: FakeOP,
                                                                   provider_id: str) -> None:
    fake_op.subject_email = f"new-{secrets.token_hex(4)}@acme.test"
    _b, page, _s, _n = _start(portal, provider_id)
    assert page.status == 403 and f"There is no user {fake_op.subject_email}" in page.message
    portal.fz("provider", "set", "Fake", "--create-users")
    try:
        _b, page, _s, nonce = _start(portal, provider_id)
        assert page.status == 200, page.text
        cb = client_auth.parse_callback(page.callback)
        _code, data = session_of(portal, client_auth.assemble_token(nonce, cb.fragment))
        assert data["data"]["actor"]["type"] == "user"
    finally:
        portal.fz("provider", "set", "Fake", "--no-create-users")


def test_forged_state_at_the_callback_is_refused(portal: Portal, fake_op: FakeOP, provider_id: str) -> None:
    fake_op.subject_email = portal.user()
    b = Browser(portal.url)
    url, _s, _n = client_url(portal)
    r = b.submit(b.get(url), f"oidc-{provider_id}")
    to_op = b.get(r.location or "")
    back = urllib.parse.urlsplit(to_op.location or "")
    q = dict(urllib.parse.parse_qsl(back.query))
    q["state"] = "forged-" + q["state"][7:]
    page = b.get(f"{portal.url}{back.path}?{urllib.parse.urlencode(q)}")
    assert page.status == 401 and "state mismatch" in page.message


def test_callback_in_another_browser_is_refused(portal: Portal, fake_op: FakeOP, provider_id: str) -> None:
    b = Browser(portal.url)
    url, _s, _n = client_url(portal)
    r = b.submit(b.get(url), f"oidc-{provider_id}")
    to_op = b.get(r.location or "")
    page = Browser(portal.url).get(to_op.location or "")
    assert page.status == 400 and "another browser" in page.message


def test_provider_error_is_shown(portal: Portal, fake_op: FakeOP, provider_id: str) -> None:
    b = Browser(portal.url)
    url, _s, _n = client_url(portal)
    r = b.submit(b.get(url), f"oidc-{provider_id}")
    state = urllib.parse.parse_qs(urllib.parse.urlsplit(r.location or "").query)["state"][0]
    page = b.get(f"{portal.url}/auth/oidc/callback?" + urllib.parse.urlencode(
        {"state": state, "error": "access_denied", "error_description": "the user said no"}))
    assert page.status == 401 and "the user said no" in page.message


def test_unreachable_provider_is_explained(portal: Portal) -> None:
    portal.fz("provider", "add", "oidc", "Gone", "--issuer", "http://127.0.0.1:9", "--client-id", "x",
              "--client-secret", "y")
    try:
        pid = portal.admin().ok("GET", "/providers/Gone")["data"]["id"]
        b = Browser(portal.url)
        url, _s, _n = client_url(portal)
        page = b.submit(b.get(url), f"oidc-{pid}")
        assert page.status == 502 and "could not be reached" in page.message
    finally:
        portal.fz("provider", "remove", "Gone")


def test_admin_signs_in_to_the_portal_pages_with_oidc(portal: Portal, fake_op: FakeOP, provider_id: str) -> None:
    fake_op.subject_email = portal.user("admin")
    _b, page, _s, _n = _start(portal, provider_id, kind="admin")
    assert page.status == 303 and page.location == "/acme/admin", page.text
    assert any(c.startswith("fz_session=") for c in page.headers.get_all("Set-Cookie"))
    fake_op.subject_email = portal.user()
    _b, page, _s, _n = _start(portal, provider_id, kind="admin")
    assert page.status == 403 and "Only admins" in page.message
