"""``fz client login|handle-url|whoami|logout`` and ``fz provider`` as real processes."""

from __future__ import annotations

import json
import os
import queue
import re
import stat
import subprocess
import threading
import urllib.parse
from pathlib import Path

import pytest

from firezone import client_auth
from tests.cli.conftest import FZ
from tests.signin.conftest import Browser, Portal, mail_code, session_of

pytestmark = pytest.mark.timeout(120)


class Login:
    """A running ``fz client login --no-browser``; stderr lines are collected as they come."""

    def __init__(self, portal: Portal, env: dict[str, str], *extra: str) -> None:
        self.proc = subprocess.Popen([*FZ, "client", "login", "--portal", portal.url, "--account", "acme",
                                      "--no-browser", "--timeout", "60", *extra], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: queue.Queue[str] = queue.Queue()
        self.err: list[str] = []
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.append(line)
            self.lines.put(line)

    def url(self) -> str:
        while True:
            line = self.lines.get(timeout=30)
            if line.startswith("http://"):
                return line.strip()

    def wait_ready(self) -> None:
        while "Waiting for the sign-in" not in self.lines.get(timeout=30):
            pass

    def finish(self, timeout: float = 30) -> tuple[int, str, str]:
        # not communicate(): it would read stderr too, racing the pump thread
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=timeout)
        out = self.proc.stdout.read()
        self._pump_thread.join(10)
        return self.proc.returncode, out, "".join(self.err)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _browser_sign_in(portal: Portal, url: str, email: str) -> str:
    """Do in a cookie browser what a person does on the page; returns the callback URL shown."""
    b = Browser(portal.url)
    page = b.follow(b.submit(b.get(url), "email-form", email=email))
    done = b.submit(page, "code-form", code=mail_code(portal.mail.wait_for(email)))
    assert done.status == 200, done.text
    return done.callback


def test_login_by_pasting_the_callback_then_whoami_and_logout(portal: Portal) -> None:
    env = portal.client_env("paste")
    email = portal.user()
    login = Login(portal, env)
    try:
        url = login.url()
        q = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
        assert q["as"] == ["client"] and len(q["state"][0]) == 64 and len(q["nonce"][0]) == 64
        callback = _browser_sign_in(portal, url, email)
        assert login.proc.stdin is not None
        login.proc.stdin.write("not a link\n" + callback + "\n")
        login.proc.stdin.flush()
        code, out, err = login.finish()
    finally:
        login.kill()
    assert code == 0, err
    assert "that is not the sign-in link" in err
    cred = Path(env["XDG_CONFIG_HOME"]) / "firezone" / "credentials" / "client.json"
    assert f"Signed in as {email.split('@')[0]} ({email}) to account acme (acme)" in out
    assert str(cred) in out and "0600" in out
    assert stat.S_IMODE(cred.stat().st_mode) == 0o600
    stored = json.loads(cred.read_text())
    assert stored["account"] == "acme" and stored["portal"] == portal.url and stored["actor_email"] == email
    assert stored["token"].startswith(q["nonce"][0] + ".")
    assert q["nonce"][0] not in callback

    who = portal.fz("--json", "client", "whoami", env=env).stdout
    assert json.loads(who)["actor"]["email"] == email

    token = stored["token"]
    out = portal.fz("client", "logout", env=env).stdout
    assert "Signed out of acme" in out
    assert not cred.exists()
    code, data = session_of(portal, token)
    assert code == 401 and data["detail"] == "token revoked"
    r = portal.fz("client", "whoami", env=env, expect=1)
    assert "not signed in" in r.stderr


def test_login_through_the_desktop_handler(portal: Portal) -> None:
    env = portal.client_env("handler")
    email = portal.user()
    login = Login(portal, env)
    try:
        url = login.url()
        login.wait_ready()
        callback = _browser_sign_in(portal, url, email)
        r = portal.fz("client", "handle-url", callback, env=env)
        assert "Handed the sign-in" in r.stdout
        code, out, err = login.finish()
    finally:
        login.kill()
    assert code == 0, err
    assert "Received the sign-in from the browser" in err
    assert f"({email}) to account acme" in out


def test_forged_state_is_refused(portal: Portal) -> None:
    env = portal.client_env("forged")
    email = portal.user()
    login = Login(portal, env)
    try:
        login.url()
        login.wait_ready()
        # a sign-in that some other login (or an attacker) started
        other_url = f"{portal.url}/acme?as=client&state={'ab' * 32}&nonce={'cd' * 32}"
        callback = _browser_sign_in(portal, other_url, email)
        r = portal.fz("client", "handle-url", callback, env=env, expect=1)
        assert "refused" in r.stderr and "state mismatch" in r.stderr
        code, _out, err = login.finish()
    finally:
        login.kill()
    assert code == 1
    assert "refused the sign-in: its state does not match" in err
    assert "Traceback" not in err
    assert not (Path(env["XDG_CONFIG_HOME"]) / "firezone" / "credentials" / "client.json").exists()


def test_handle_url_without_a_waiting_login(portal: Portal) -> None:
    env = portal.client_env("nobody")
    cb = client_auth.callback_url(fragment=".00000000-0000-0000-0000-000000000000.abc", actor_name="x",
                                  account_slug="acme", account_name="acme", state="s")
    r = portal.fz("client", "handle-url", cb, env=env, expect=1)
    assert "no `fz client login` is waiting" in r.stderr
    r = portal.fz("client", "handle-url", "https://example.com/", env=env, expect=1)
    assert "not a sign-in callback" in r.stderr


def test_second_login_while_one_waits_is_refused(portal: Portal) -> None:
    env = portal.client_env("twice")
    first = Login(portal, env)
    try:
        first.wait_ready()
        second = Login(portal, env)
        code, _out, err = second.finish()
        assert code == 1 and "already waiting" in err
    finally:
        first.kill()


def test_whoami_after_the_token_is_revoked(portal: Portal) -> None:
    env = portal.client_env("revoked")
    email = portal.user()
    login = Login(portal, env)
    try:
        url = login.url()
        login.wait_ready()
        portal.fz("client", "handle-url", _browser_sign_in(portal, url, email), env=env)
        assert login.finish()[0] == 0
    finally:
        login.kill()
    tid = json.loads(portal.fz("--json", "client", "whoami", env=env).stdout)
    tokens = portal.admin().ok("GET", "/tokens?type=client")["data"]
    mine = [t for t in tokens if t["actor"] and t["actor"]["email"] == email]
    assert len(mine) == 1 and tid["actor"]["email"] == email
    portal.admin().ok("DELETE", f"/tokens/{mine[0]['id']}", status=204)
    r = portal.fz("client", "whoami", env=env, expect=1)
    assert "no longer valid (token revoked)" in r.stderr


def test_socket_path_is_private(portal: Portal, tmp_path: Path) -> None:
    env = portal.client_env("private")
    login = Login(portal, env)
    try:
        login.wait_ready()
        sock = Path(env["XDG_STATE_HOME"]) / "firezone" / "sign-in.sock"
        assert sock.exists(), os.listdir(sock.parent)
        assert stat.S_IMODE(sock.stat().st_mode) & 0o077 == 0
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    finally:
        login.kill()


def test_provider_cli_add_list_remove(portal: Portal) -> None:
    r = portal.fz("--json", "provider", "add", "oidc", "Corp", "--issuer", "https://idp.example.com/",
                  "--client-id", "cid", "--client-secret", "very-secret", "--create-users",
                  "--client-session", "12h")
    p = json.loads(r.stdout)
    assert p["issuer"] == "https://idp.example.com" and p["create_users"] is True
    assert p["client_session_lifetime"] == 43200
    listing = portal.fz("--json", "provider", "list").stdout
    assert "very-secret" not in listing
    names = [x["name"] for x in json.loads(listing)]
    assert "Email" in names and "Corp" in names
    human = portal.fz("provider", "list").stdout
    assert re.search(r"Corp\s+oidc\s+yes", human), human
    portal.fz("provider", "disable", "Corp")
    page = Browser(portal.url).get(f"{portal.url}/acme")
    assert "Sign in with Corp" not in page.text
    portal.fz("provider", "enable", "Corp")
    assert "Sign in with Corp" in Browser(portal.url).get(f"{portal.url}/acme").text
    portal.fz("provider", "remove", "Corp")
    assert "Corp" not in portal.fz("provider", "list").stdout
    bad = portal.fz("provider", "add", "oidc", "Plain", "--issuer", "http://idp.example.com",
                    "--client-id", "c", "--client-secret", "s", expect=1)
    assert "https://" in bad.stderr
    bad = portal.fz("provider", "add", "oidc", "Short", "--issuer", "https://idp.example.com",
                    "--client-id", "c", "--client-secret", "s", "--client-session", "10m", expect=1)
    assert "client_session_lifetime" in bad.stderr


def test_headless_login_prints_the_token_page(portal: Portal) -> None:
    env = portal.client_env("headless")
    r = portal.fz("client", "login", "--portal", portal.url, "--account", "acme", "--headless", env=env)
    assert f"{portal.url}/acme?as=headless-client" in r.stdout and "FIREZONE_TOKEN" in r.stdout


def test_install_handler_registers_the_scheme_for_this_user(portal: Portal) -> None:
    env = portal.client_env("xdg")
    mimeapps = Path(env["XDG_CONFIG_HOME"]) / "mimeapps.list"
    mimeapps.write_text("[Default Applications]\ntext/html=firefox.desktop\n"
                        "x-scheme-handler/firezone-fd0020211111=old.desktop\n\n[Added Associations]\nimage/png=eog.desktop\n")
    for _ in range(2):  # idempotent
        portal.fz("client", "install-handler", env=env)
    entry = Path(env["XDG_DATA_HOME"]) / "applications" / "firezone-handler.desktop"
    text = entry.read_text()
    assert "MimeType=x-scheme-handler/firezone-fd0020211111;" in text
    assert " client handle-url %u" in text
    lines = mimeapps.read_text().splitlines()
    assert lines.count("x-scheme-handler/firezone-fd0020211111=firezone-handler.desktop") == 1
    assert "x-scheme-handler/firezone-fd0020211111=old.desktop" not in lines
    assert "text/html=firefox.desktop" in lines and "image/png=eog.desktop" in lines
    default = lines.index("[Default Applications]")
    assert lines.index("x-scheme-handler/firezone-fd0020211111=firezone-handler.desktop") < lines.index(
        "[Added Associations]") and default < lines.index("text/html=firefox.desktop")
    # the Exec line really runs the handler (which, with nobody waiting, says so)
    cmd = next(x for x in text.splitlines() if x.startswith("Exec=")).removeprefix("Exec=").split()
    cb = client_auth.callback_url(fragment=".00000000-0000-0000-0000-000000000000.abc", actor_name="x",
                                  account_slug="acme", account_name="acme", state="s")
    r = subprocess.run([c if c != "%u" else cb for c in cmd], env=env, capture_output=True, text=True,
                       timeout=30, check=False)
    assert r.returncode == 1 and "no `fz client login` is waiting" in r.stderr


def test_install_handler_without_a_mimeapps_file(portal: Portal) -> None:
    env = portal.client_env("xdg-empty")
    portal.fz("client", "install-handler", env=env)
    assert (Path(env["XDG_CONFIG_HOME"]) / "mimeapps.list").read_text() == (
        "[Default Applications]\nx-scheme-handler/firezone-fd0020211111=firezone-handler.desktop\n")
