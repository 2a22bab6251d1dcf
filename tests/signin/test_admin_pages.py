"""The admin web session: sign-in with the same providers, dashboard, CSRF, admins only."""

from __future__ import annotations

import pytest

from tests.signin.conftest import ADMIN, Browser, Page, Portal, mail_code

pytestmark = pytest.mark.timeout(120)


def _admin_sign_in(portal: Portal, email: str) -> tuple[Browser, Page]:
    b = Browser(portal.url)
    page = b.get(f"{portal.url}/acme")  # no "as": the portal's own pages
    assert page.status == 200 and "Admin portal" in page.text
    n = len(portal.mail.to(email))
    page = b.follow(b.submit(page, "email-form", email=email))
    done = b.submit(page, "code-form", code=mail_code(portal.mail.wait_for(email, n + 1)))
    return b, done


def test_admin_signs_in_and_sees_the_dashboard(portal: Portal) -> None:
    email = portal.user("admin")
    b, done = _admin_sign_in(portal, email)
    assert done.status == 303 and done.location == "/acme/admin", done.text
    cookie = next(c for c in done.headers.get_all("Set-Cookie") if c.startswith("fz_session="))
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain http on loopback; under TLS it is set
    dash = b.follow(done)
    assert dash.status == 200
    for section in ("users", "groups", "resources", "policies", "audit"):
        assert f'id="{section}"' in dash.text
    assert email in dash.text and ADMIN in dash.text and "Everyone" in dash.text
    # the sign-in page of a signed-in admin goes straight to the dashboard
    assert b.get(f"{portal.url}/acme").location == "/acme/admin"


def test_session_secret_is_stored_only_as_a_hash(portal: Portal) -> None:
    b, _done = _admin_sign_in(portal, portal.user("admin"))
    c = b.cookie("fz_session")
    assert c is not None and c.value
    sid, secret = c.value.split(".", 1)
    import sqlite3

    db = sqlite3.connect(portal.data_dir / "portal.db")
    try:
        row = db.execute("SELECT secret_hash FROM web_sessions WHERE id = ?", (sid,)).fetchone()
        dump = "\n".join(db.iterdump())
    finally:
        db.close()
    import hashlib

    assert row[0] == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in dump


def test_add_group_form(portal: Portal) -> None:
    b, done = _admin_sign_in(portal, portal.user("admin"))
    dash = b.follow(done)
    r = b.submit(dash, "add-group", name="Engineers")
    assert r.status == 303 and r.location == "/acme/admin?done=group-added"
    after = b.follow(r)
    assert "Group added." in after.text and "Engineers" in after.text
    assert portal.admin().ok("GET", "/groups/Engineers")["data"]["name"] == "Engineers"
    dup = b.submit(after, "add-group", name="Engineers")
    assert dup.status == 422 and "already exists" in dup.text


def test_form_post_without_or_with_a_wrong_csrf_token_is_refused(portal: Portal) -> None:
    b, done = _admin_sign_in(portal, portal.user("admin"))
    dash = b.follow(done)
    action, fields = dash.form("add-group")
    r = b.post(action, {"name": "NoCsrf"})
    assert r.status == 403 and "another site" in r.message
    r = b.post(action, {"name": "NoCsrf", "csrf_token": "0" * 64})
    assert r.status == 403
    # the token of another session does not fit this one
    other, done2 = _admin_sign_in(portal, portal.user("admin"))
    other_token = other.follow(done2).form("add-group")[1]["csrf_token"]
    assert other_token != fields["csrf_token"]
    assert b.post(action, {"name": "NoCsrf", "csrf_token": other_token}).status == 403
    code, _d, _h = portal.admin().call("GET", "/groups/NoCsrf")
    assert code == 404


def test_non_admin_cannot_sign_in_to_the_admin_pages(portal: Portal) -> None:
    email = portal.user()
    b, done = _admin_sign_in(portal, email)
    assert done.status == 403 and "Only admins" in done.message
    assert b.cookie("fz_session") is None
    r = b.get(f"{portal.url}/acme/admin")
    assert r.status == 303 and r.location == "/acme?as=admin"


def test_demoted_admin_loses_the_dashboard(portal: Portal) -> None:
    email = portal.user("admin")
    b, done = _admin_sign_in(portal, email)
    assert b.follow(done).status == 200
    portal.admin().ok("PATCH", f"/users/{email}", {"type": "user"})
    r = b.get(f"{portal.url}/acme/admin")
    assert r.status == 403 and "Only admins" in r.message


def test_sign_out_ends_the_session(portal: Portal) -> None:
    b, done = _admin_sign_in(portal, portal.user("admin"))
    dash = b.follow(done)
    stolen = b.cookie("fz_session")
    r = b.submit(dash, "sign-out")
    assert r.status == 303 and r.location == "/acme?as=admin"
    assert b.get(f"{portal.url}/acme/admin").status == 303
    assert stolen is not None
    b.jar.set_cookie(stolen)  # the old cookie value is dead at the portal, not only in the browser
    assert b.get(f"{portal.url}/acme/admin").status == 303


def test_session_of_one_account_does_not_open_another(portal: Portal) -> None:
    email = portal.user("admin")
    portal.fz("portal", "add-account", "--data-dir", str(portal.data_dir), "--account", "beta",
              "--admin-email", email)
    b, done = _admin_sign_in(portal, email)
    assert b.follow(done).status == 200
    r = b.get(f"{portal.url}/beta/admin")
    assert r.status == 303 and r.location == "/beta?as=admin"
