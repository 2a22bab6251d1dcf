"""Email-code sign-in against a real portal and a real SMTP server (no browser needed: plain forms)."""

from __future__ import annotations

import time
import urllib.parse
from datetime import UTC
from pathlib import Path

import pytest

from firezone import client_auth
from tests.signin.conftest import (
    RESPONSE_MS,
    Browser,
    Portal,
    check_log,
    client_url,
    email_sign_in,
    mail_code,
    mail_link,
    session_of,
    start_portal,
)

pytestmark = pytest.mark.timeout(120)


def _complete(portal: Portal, email: str, **kw: str) -> tuple[Browser, client_auth.Callback, str]:
    b, page, state, nonce = email_sign_in(portal, email, **kw)
    code = mail_code(portal.mail.wait_for(email))
    done = b.submit(page, "code-form", code=code)
    assert done.status == 200, done.text
    cb = client_auth.parse_callback(done.callback)
    assert client_auth.state_matches(state, cb.state)
    return b, cb, client_auth.assemble_token(nonce, cb.fragment)


def test_code_by_mail_signs_the_client_in(portal: Portal) -> None:
    email = portal.user()
    b, page, state, nonce = email_sign_in(portal, email)
    assert "Check your email" in page.text
    msg = portal.mail.wait_for(email)
    assert msg["To"] == email and "sign-in code" in msg["Subject"]
    done = b.submit(page, "code-form", code=mail_code(msg))
    assert done.status == 200, done.text
    assert f'url={client_auth.CALLBACK_PREFIX}' in done.text.replace("&amp;", "&")
    cb = client_auth.parse_callback(done.callback)
    assert cb.state == state and cb.account_slug == "acme" and cb.actor_name == email.split("@")[0]
    # the callback alone is useless: the portal wants the nonce in front of the fragment
    assert session_of(portal, cb.fragment)[0] == 401
    code, data = session_of(portal, client_auth.assemble_token(nonce, cb.fragment))
    assert code == 200, data
    assert data["data"]["actor"]["email"] == email and data["data"]["token"]["provider"] == "Email"
    assert b.cookie("fz_flow") is None, "the finished sign-in must leave no flow cookie"


def test_client_token_lifetime_is_seven_days_by_default(portal: Portal) -> None:
    _b, _cb, token = _complete(portal, portal.user())
    _code, data = session_of(portal, token)
    from datetime import datetime

    exp = datetime.fromisoformat(data["data"]["token"]["expires_at"])
    days = (exp - datetime.now(UTC)).total_seconds() / 86400
    assert 6.99 < days < 7.01


def test_provider_session_lifetime_applies_to_new_client_tokens(portal: Portal) -> None:
    portal.fz("provider", "set", "Email", "--client-session", "2h")
    try:
        _b, _cb, token = _complete(portal, portal.user())
    finally:
        portal.fz("provider", "set", "Email", "--client-session", "7d")
    _code, data = session_of(portal, token)
    from datetime import datetime

    exp = datetime.fromisoformat(data["data"]["token"]["expires_at"])
    hours = (exp - datetime.now(UTC)).total_seconds() / 3600
    assert 1.99 < hours < 2.01


def test_magic_link_works_only_in_the_same_browser(portal: Portal) -> None:
    email = portal.user()
    b, _page, state, _nonce = email_sign_in(portal, email)
    link = mail_link(portal.mail.wait_for(email))
    other = Browser(portal.url).get(link)
    assert other.status == 400 and "did not ask for this code" in other.message
    same = b.get(link)
    assert same.status == 200, same.text
    assert client_auth.parse_callback(same.callback).state == state


def test_wrong_code_then_right_code(portal: Portal) -> None:
    email = portal.user()
    b, page, _s, _n = email_sign_in(portal, email)
    code = mail_code(portal.mail.wait_for(email))
    wrong = b.submit(page, "code-form", code="zzzzzz" if code != "zzzzzz" else "yyyyyy")
    assert wrong.status == 401 and "That code is wrong" in wrong.message and "2 more" in wrong.message
    ok = b.submit(page, "code-form", code=code.upper())
    assert ok.status == 200, ok.text


def test_fourth_attempt_is_refused_even_with_the_right_code(portal: Portal) -> None:
    email = portal.user()
    b, page, _s, _n = email_sign_in(portal, email)
    code = mail_code(portal.mail.wait_for(email))
    for left in ("2 more", "1 more", "No attempts are left"):
        r = b.submit(page, "code-form", code="wrong1")
        assert r.status == 401 and left in r.message, r.message
    r = b.submit(page, "code-form", code=code)
    assert r.status == 429 and "too many times" in r.message


def test_reused_code_is_refused(portal: Portal) -> None:
    email = portal.user()
    b, page, _s, _n = email_sign_in(portal, email)
    code = mail_code(portal.mail.wait_for(email))
    flow_cookie = b.cookie("fz_flow")
    assert flow_cookie is not None
    assert b.submit(page, "code-form", code=code).status == 200
    b.jar.set_cookie(flow_cookie)  # a replay with the same browser state
    again = b.submit(page, "code-form", code=code)
    assert again.status == 410 and "already used" in again.message


def test_new_code_replaces_the_old_one(portal: Portal) -> None:
    email = portal.user()
    b, _page, _s, _n = email_sign_in(portal, email)
    first = mail_code(portal.mail.wait_for(email, 1))
    _b, page2, _s2, _n2 = email_sign_in(portal, email, browser=b)
    second = mail_code(portal.mail.wait_for(email, 2))
    assert b.submit(page2, "code-form", code=first).status == 401 or first == second
    assert b.submit(page2, "code-form", code=second).status == 200


def test_unknown_address_gets_the_same_answer_and_timing_and_no_mail(portal: Portal) -> None:
    known = portal.user()
    unknown = f"nobody-{time.time_ns()}@acme.test"
    timings = {}
    pages = {}
    for email in (known, unknown):
        b = Browser(portal.url)
        url, _s, _n = client_url(portal)
        form_page = b.get(url)
        started = time.monotonic()
        r = b.submit(form_page, "email-form", email=email)
        timings[email] = time.monotonic() - started
        pages[email] = (r.status, urllib.parse.urlsplit(r.location or "").path, b.follow(r))
    assert pages[known][:2] == pages[unknown][:2]
    assert pages[unknown][2].status == 200 and "Check your email" in pages[unknown][2].text
    for t in timings.values():
        assert t >= RESPONSE_MS / 1000 - 0.01
    assert abs(timings[known] - timings[unknown]) < 0.25, timings
    portal.mail.wait_for(known)
    time.sleep(0.5)
    assert portal.mail.to(unknown) == []
    # and a code for the unknown address never works
    b = Browser(portal.url)
    url, _s, _n = client_url(portal)
    page = b.follow(b.submit(b.get(url), "email-form", email=f"x{unknown}"))
    assert b.submit(page, "code-form", code="abcdef").status == 401


def test_at_most_three_mails_per_address_in_five_minutes(portal: Portal) -> None:
    email = portal.user()
    for n in range(1, 4):
        email_sign_in(portal, email)
        portal.mail.wait_for(email, n)
    b = Browser(portal.url)
    url, _s, _n = client_url(portal)
    r = b.submit(b.get(url), "email-form", email=email)
    assert r.status == 429 and "Too many sign-in codes" in r.message
    time.sleep(0.5)
    assert len(portal.mail.to(email)) == 3


def test_form_post_without_csrf_token_is_refused(portal: Portal) -> None:
    email = portal.user()
    b = Browser(portal.url)
    url, _state, _nonce = client_url(portal)
    page = b.get(url)
    action, fields = page.form("email-form")
    fields.pop("csrf_token")
    r = b.post(action, {**fields, "email": email})
    assert r.status == 403 and "another site" in r.message
    r = b.post(action, {**fields, "email": email, "csrf_token": "forged-value-forged-value"})
    assert r.status == 403
    time.sleep(0.5)
    assert portal.mail.to(email) == []


def test_sign_in_link_without_state_or_nonce_is_refused(portal: Portal) -> None:
    r = Browser(portal.url).get(f"{portal.url}/acme?as=client&state=abc")
    assert r.status == 400 and "incomplete" in r.message
    r = Browser(portal.url).get(f"{portal.url}/acme?as=client&state=abc&nonce=a.b")
    assert r.status == 400 and "invalid nonce" in r.message
    assert Browser(portal.url).get(f"{portal.url}/no-such-account").status == 404


def test_headless_client_gets_the_whole_token_to_copy(portal: Portal) -> None:
    email = portal.user()
    b = Browser(portal.url)
    page = b.get(f"{portal.url}/acme?as=headless-client")
    page = b.follow(b.submit(page, "email-form", email=email))
    done = b.submit(page, "code-form", code=mail_code(portal.mail.wait_for(email)))
    assert done.status == 200
    import re

    token = re.search(r'id="token" readonly>([^<]+)</textarea>', done.text)
    assert token, done.text
    assert session_of(portal, token.group(1))[0] == 200


def test_revoked_token_is_refused(portal: Portal) -> None:
    _b, _cb, token = _complete(portal, portal.user())
    code, data = session_of(portal, token)
    assert code == 200
    portal.admin().ok("DELETE", f"/tokens/{data['data']['token']['id']}", status=204)
    code, data = session_of(portal, token)
    assert code == 401 and data["detail"] == "token revoked"


def test_token_of_one_account_is_refused_by_another(portal: Portal) -> None:
    r = portal.fz("--json", "portal", "add-account", "--data-dir", str(portal.data_dir), "--account", "other",
                  "--admin-email", "admin@other.test")
    assert '"other"' in r.stdout
    _b, _cb, token = _complete(portal, portal.user())
    code, data = session_of(portal, token, account="other")
    assert code == 401 and "another account" in data["detail"]
    assert session_of(portal, token, account="acme")[0] == 200


def test_disabled_user_cannot_finish(portal: Portal) -> None:
    email = portal.user()
    b, page, _s, _n = email_sign_in(portal, email)
    code = mail_code(portal.mail.wait_for(email))
    portal.admin().ok("PATCH", f"/users/{email}", {"disabled": True})
    r = b.submit(page, "code-form", code=code)
    assert r.status == 403 and "disabled" in r.message


def test_expired_code_is_refused(tmp_path: Path, mailbox: tuple) -> None:
    p = start_portal(tmp_path, mailbox, FIREZONE_PORTAL_EMAIL_CODE_TTL="1")
    try:
        email = p.user()
        b, page, _s, _n = email_sign_in(p, email)
        code = mail_code(p.mail.wait_for(email))
        time.sleep(1.5)
        r = b.submit(page, "code-form", code=code)
        assert r.status == 410 and "expired" in r.message
    finally:
        p.stop()
    check_log(p)


def test_smtp_print_writes_the_mail_to_the_portal_log(tmp_path: Path, mailbox: tuple) -> None:
    p = start_portal(tmp_path, mailbox, "--smtp-print", FIREZONE_PORTAL_SMTP_HOST="")
    try:
        email = p.user()
        b, page, state, _n = email_sign_in(p, email)
        deadline = time.monotonic() + 10
        import re

        while not (m := re.search(r"sign in to acme is:\\n\\n    ([a-z0-9]{6})", p.log_text())):
            assert time.monotonic() < deadline, p.log_text()
            time.sleep(0.1)
        assert "--smtp-print, not sent" in p.log_text() and email in p.log_text()
        done = b.submit(page, "code-form", code=m.group(1))
        assert client_auth.parse_callback(done.callback).state == state
        assert p.mail.to(email) == []
    finally:
        p.stop()
    check_log(p)


def test_forged_host_header_gets_no_link_in_the_mail(portal: Portal) -> None:
    import http.client

    email = portal.user()
    b = Browser(portal.url)
    url, _s, _n = client_url(portal)
    action, fields = b.get(url).form("email-form")
    conn = http.client.HTTPConnection("127.0.0.1", portal.port, timeout=10)
    try:
        conn.request("POST", action, urllib.parse.urlencode({**fields, "email": email}), headers={
            "Host": "evil.example", "Content-Type": "application/x-www-form-urlencoded",
            "Cookie": f"fz_csrf={fields['csrf_token']}"})
        assert conn.getresponse().status == 303
    finally:
        conn.close()
    body = portal.mail.wait_for(email).get_payload(decode=True).decode()
    assert "evil.example" not in body and "http" not in body
    assert "sign in to acme is" in body
