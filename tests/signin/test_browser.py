"""Headless Chromium from ``fz client login --no-browser``'s URL to the stored token.

The browser cannot launch the custom scheme, so the test catches the
``firezone-fd0020211111://`` navigation and hands the URL to the waiting login with
``fz client handle-url``, exactly as the desktop handler would. Every request to a host other
than 127.0.0.1 is aborted (the OpenID provider's login page links a web font).
"""

from __future__ import annotations

import json
import queue
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from firezone import client_auth
from tests.signin.conftest import NodeOP, Portal, mail_code, session_of
from tests.signin.test_client_cli import Login

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian chromium is required for the browser tests"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


class Tab:
    """A fresh browser context that records the custom-scheme navigation and stays on loopback."""

    def __init__(self, browser: Any) -> None:
        self.context = browser.new_context()
        self.callbacks: queue.Queue[str] = queue.Queue()
        self.blocked: list[str] = []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("request", self._request)

    def _request(self, request: Any) -> None:
        if request.url.startswith(client_auth.SCHEME + ":"):
            self.callbacks.put(request.url)

    def _route(self, route: Any) -> None:
        url = route.request.url
        if url.startswith(client_auth.SCHEME + ":"):
            self.callbacks.put(url)
            route.abort()
        elif urllib.parse.urlsplit(url).hostname == "127.0.0.1":
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort()

    def callback(self, timeout: float = 15) -> str:
        # the sync API delivers events only while it runs: wait inside playwright, not in queue.get
        for _ in range(int(timeout * 10)):
            try:
                return self.callbacks.get_nowait()
            except queue.Empty:
                self.page.wait_for_timeout(100)
        raise AssertionError(f"the page never navigated to {client_auth.SCHEME}://; it shows:\n"
                             + self.page.content())

    def close(self) -> None:
        self.context.close()


def _finish_login(portal: Portal, env: dict[str, str], login: Login, callback: str, email: str) -> None:
    r = portal.fz("client", "handle-url", callback, env=env)
    assert "Handed the sign-in" in r.stdout
    code, out, err = login.finish()
    assert code == 0, err
    assert f"({email}) to account acme" in out
    stored = json.loads((Path(env["XDG_CONFIG_HOME"]) / "firezone" / "credentials" / "client.json").read_text())
    assert stored["actor_email"] == email
    assert session_of(portal, stored["token"])[0] == 200


def test_email_code_sign_in_in_chromium(portal: Portal, browser: Any) -> None:
    env = portal.client_env("chromium-email")
    email = portal.user()
    login = Login(portal, env)
    tab = Tab(browser)
    try:
        url = login.url()
        login.wait_ready()
        page = tab.page
        page.goto(url)
        assert page.title() == "Sign in to acme · fz"
        page.fill("#email", email)
        page.click("#email-form button[type=submit]")
        page.wait_for_selector("#code")
        assert "Check your email" in page.content()
        page.fill("#code", mail_code(portal.mail.wait_for(email)))
        page.click("#code-form button[type=submit]")
        callback = tab.callback()
        assert page.locator("h1").inner_text().startswith("Signed in as")
        _finish_login(portal, env, login, callback, email)
    finally:
        tab.close()
        login.kill()


def test_oidc_sign_in_in_chromium(portal: Portal, oidc_op: NodeOP, browser: Any) -> None:
    portal.fz("provider", "add", "oidc", "Dev", "--issuer", oidc_op.issuer, "--client-id", oidc_op.client_id,
              "--client-secret", oidc_op.client_secret)
    env = portal.client_env("chromium-oidc")
    email = portal.user()
    login = Login(portal, env)
    tab = Tab(browser)
    try:
        url = login.url()
        login.wait_ready()
        page = tab.page
        page.goto(url)
        page.click("text=Sign in with Dev")
        page.wait_for_selector("input[name=login]")
        assert page.url.startswith(oidc_op.issuer)
        page.fill("input[name=login]", email)
        page.fill("input[name=password]", "anything")
        page.click("button[type=submit]")
        callback = tab.callback()
        cb = client_auth.parse_callback(callback)
        assert cb.account_slug == "acme" and cb.actor_name == email.split("@")[0]
        _finish_login(portal, env, login, callback, email)
        assert all("127.0.0.1" not in u for u in tab.blocked)
    finally:
        tab.close()
        login.kill()
        portal.fz("provider", "remove", "Dev", expect=None)


def test_oidc_unknown_user_sees_why_in_chromium(portal: Portal, oidc_op: NodeOP, browser: Any) -> None:
    portal.fz("provider", "add", "oidc", "Dev2", "--issuer", oidc_op.issuer, "--client-id", oidc_op.client_id,
              "--client-secret", oidc_op.client_secret)
    tab = Tab(browser)
    try:
        page = tab.page
        page.goto(f"{portal.url}/acme?as=client&state={'a' * 64}&nonce={'b' * 64}")
        page.click("text=Sign in with Dev2")
        page.wait_for_selector("input[name=login]")
        page.fill("input[name=login]", "stranger@acme.test")
        page.fill("input[name=password]", "x")
        page.click("button[type=submit]")
        page.wait_for_selector("#message")
        assert "There is no user stranger@acme.test in acme" in page.inner_text("#message")
        assert tab.callbacks.empty()
    finally:
        tab.close()
        portal.fz("provider", "remove", "Dev2", expect=None)
