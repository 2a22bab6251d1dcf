"""Sign-in test rig: a real portal process, a real SMTP server (aiosmtpd), OpenID providers.

Everything listens on 127.0.0.1 and is started and stopped here:

- ``mailbox``: aiosmtpd on a free port; the portal sends its codes there (no STARTTLS on loopback).
- ``portal``: ``fz portal serve`` pointed at that SMTP server, with a short response floor.
- ``oidc_op``: the npm ``oidc-provider`` (tests/oidc/server.js, pinned by package-lock.json).
- ``fake_op``: a tiny OpenID provider in this process whose ID tokens can be broken on purpose
  (wrong audience/issuer/nonce, expired, signed by a key it does not publish, rotated keys).
- ``Browser``: cookies and forms over urllib, for flows that need no JavaScript and no Chromium.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import html
import http.cookiejar
import json
import re
import secrets
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiosmtpd.controller import Controller
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey

from tests.cli.conftest import FZ, free_port, isolated_env
from tests.portal_api import Api

ROOT = Path(__file__).resolve().parents[2]
OIDC_DIR = ROOT / "tests" / "oidc"
ADMIN = "admin@acme.test"
RESPONSE_MS = 300


# -- SMTP ---------------------------------------------------------------------------------------


class _Handler:
    def __init__(self, box: Mailbox) -> None:
        self.box = box

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.box.add(envelope.rcpt_tos, message_from_bytes(envelope.content))
        return "250 OK"


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[tuple[list[str], Message]] = []
        self._cv = threading.Condition()

    def add(self, rcpts: list[str], msg: Message) -> None:
        with self._cv:
            self.messages.append((rcpts, msg))
            self._cv.notify_all()

    def to(self, addr: str) -> list[Message]:
        with self._cv:
            return [m for r, m in self.messages if addr in r]

    def wait_for(self, addr: str, count: int = 1, timeout: float = 10) -> Message:
        deadline = time.monotonic() + timeout
        with self._cv:
            while len([m for r, m in self.messages if addr in r]) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no mail #{count} to {addr} within {timeout}s; have {self.messages}")
                self._cv.wait(left)
            return [m for r, m in self.messages if addr in r][count - 1]


def mail_code(msg: Message) -> str:
    body = msg.get_payload(decode=True).decode()  # type: ignore[union-attr]
    m = re.search(r"^    ([a-z0-9]{6})\r?$", body, re.MULTILINE)
    assert m, body
    return m.group(1)


def mail_link(msg: Message) -> str:
    body = msg.get_payload(decode=True).decode()  # type: ignore[union-attr]
    m = re.search(r"^(http://\S+/verify\?code=[a-z0-9]+)\r?$", body, re.MULTILINE)
    assert m, body
    return m.group(1)


@pytest.fixture(scope="module")
def mailbox() -> Iterator[tuple[Mailbox, int]]:
    box = Mailbox()
    port = free_port()
    ctl = Controller(_Handler(box), hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        yield box, port
    finally:
        ctl.stop()


# -- the portal ---------------------------------------------------------------------------------


@dataclass
class Portal:
    root: Path
    port: int
    env: dict[str, str]
    mail: Mailbox
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    serve_args: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def start(self) -> None:
        self.log_path = self.root / "portal.log"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([*FZ, "-v", "portal", "serve", "--data-dir", str(self.data_dir),
                                          "--listen", f"127.0.0.1:{self.port}", *self.serve_args], env=self.env,
                                         stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_text()
            try:
                urllib.request.urlopen(self.url + "/healthz", timeout=1).read()
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("portal did not become healthy:\n" + self.log_text())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def admin(self) -> Api:
        cred = Path(self.env["XDG_CONFIG_HOME"]) / "firezone" / "credentials" / "admin.json"
        return Api(self.url + "/api/v1", json.loads(cred.read_text())["token"])

    def fz(self, *args: str, expect: int | None = 0, env: dict[str, str] | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([*FZ, *args], env=env or self.env, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL, check=False)
        assert "Traceback" not in p.stderr, p.stderr
        if expect is not None:
            assert p.returncode == expect, f"fz {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}"
        return p

    def user(self, kind: str = "user") -> str:
        """A new user (or admin) with a unique address; returns the email."""
        email = f"{kind}-{secrets.token_hex(4)}@acme.test"
        self.admin().ok("POST", "/users", {"email": email, "type": kind}, status=201)
        return email

    def client_env(self, name: str) -> dict[str, str]:
        """An isolated OS user for `fz client ...` (its own keyring file and socket)."""
        env = isolated_env(self.root / "clients" / name)
        env.pop("XDG_RUNTIME_DIR", None)
        return env


def start_portal(root: Path, mail: tuple[Mailbox, int], *serve_args: str, **extra_env: str) -> Portal:
    env = isolated_env(root / "admin")
    env.update({"FIREZONE_PORTAL_SMTP_HOST": "127.0.0.1", "FIREZONE_PORTAL_SMTP_PORT": str(mail[1]),
                "FIREZONE_PORTAL_SMTP_STARTTLS": "false", "FIREZONE_PORTAL_SMTP_FROM": "fz <fz@acme.test>",
                "FIREZONE_PORTAL_EMAIL_RESPONSE_MS": str(RESPONSE_MS)})
    env.update(extra_env)
    p = Portal(root, free_port(), env, mail[0], serve_args=serve_args)
    init = subprocess.run([*FZ, "portal", "init", "--data-dir", str(p.data_dir), "--account", "acme",
                           "--admin-email", ADMIN, "--url", p.url], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert init.returncode == 0, init.stderr
    p.start()
    return p


def check_log(p: Portal) -> None:
    text = p.log_text()
    assert "Traceback" not in text, text
    assert '"level": "ERROR"' not in text, text


@pytest.fixture(scope="module")
def portal(tmp_path_factory: pytest.TempPathFactory, mailbox: tuple[Mailbox, int]) -> Iterator[Portal]:
    p = start_portal(tmp_path_factory.mktemp("signin"), mailbox)
    try:
        yield p
    finally:
        p.stop()
    check_log(p)


# -- a cookie-keeping HTTP client ---------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *a: Any, **kw: Any) -> None:
        return None


@dataclass
class Page:
    status: int
    url: str
    headers: Any
    text: str

    @property
    def location(self) -> str | None:
        return self.headers.get("Location")

    def field(self, name: str, form_id: str | None = None) -> str:
        scope = self.text
        if form_id:
            m = re.search(rf'<form[^>]*id="{form_id}".*?</form>', self.text, re.DOTALL)
            assert m, f"no form #{form_id} in:\n{self.text}"
            scope = m.group(0)
        m = re.search(rf'name="{name}" value="([^"]*)"', scope)
        assert m, f"no field {name} in:\n{scope}"
        return html.unescape(m.group(1))

    def form(self, form_id: str) -> tuple[str, dict[str, str]]:
        m = re.search(rf'<form method="post" action="([^"]+)"[^>]*id="{form_id}"(.*?)</form>', self.text, re.DOTALL)
        assert m, f"no form {form_id} in:\n{self.text}"
        fields = {k: html.unescape(v) for k, v in re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"',
                                                              m.group(0))}
        return html.unescape(m.group(1)), fields

    @property
    def message(self) -> str:
        m = re.search(r'id="message">(.*?)</p>', self.text, re.DOTALL)
        return html.unescape(m.group(1)) if m else ""

    @property
    def callback(self) -> str:
        m = re.search(r'id="callback-url" readonly>([^<]*)</textarea>', self.text)
        assert m, self.text
        return html.unescape(m.group(1))


class Browser:
    """Keeps cookies like a browser; never follows redirects by itself."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect)

    def cookie(self, name: str) -> http.cookiejar.Cookie | None:
        return next((c for c in self.jar if c.name == name), None)

    def request(self, method: str, url: str, data: dict[str, str] | None = None) -> Page:
        if url.startswith("/"):
            url = self.base + url
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        req = urllib.request.Request(url, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", "application/x-www-form-urlencoded")
        try:
            with self.opener.open(req, timeout=30) as r:
                return Page(r.status, url, r.headers, r.read().decode())
        except urllib.error.HTTPError as e:
            return Page(e.code, url, e.headers, e.read().decode(errors="replace"))

    def get(self, url: str) -> Page:
        return self.request("GET", url)

    def post(self, url: str, data: dict[str, str]) -> Page:
        return self.request("POST", url, data)

    def follow(self, page: Page, limit: int = 10) -> Page:
        """Follow http(s) redirects (the way a browser does after a form post)."""
        for _ in range(limit):
            if page.status not in (301, 302, 303, 307) or not page.location:
                return page
            nxt = urllib.parse.urljoin(page.url, page.location)
            if not nxt.startswith("http"):
                return page
            page = self.get(nxt)
        raise AssertionError("too many redirects")

    def submit(self, page: Page, form_id: str, **values: str) -> Page:
        action, fields = page.form(form_id)
        return self.post(urllib.parse.urljoin(page.url, action), {**fields, **values})


def client_url(portal: Portal, *, kind: str = "client", account: str = "acme") -> tuple[str, str, str]:
    state, nonce = secrets.token_hex(32), secrets.token_hex(32)
    q = urllib.parse.urlencode({"as": kind, "state": state, "nonce": nonce})
    return f"{portal.url}/{account}?{q}", state, nonce


def email_sign_in(portal: Portal, email: str, *, kind: str = "client",
                  browser: Browser | None = None) -> tuple[Browser, Page, str, str]:
    """Ask for a code in a fresh browser; returns the browser, the code page, the state and nonce."""
    b = browser or Browser(portal.url)
    url, state, nonce = client_url(portal, kind=kind)
    page = b.get(url)
    assert page.status == 200, page.text
    got = b.submit(page, "email-form", email=email)
    assert got.status == 303, got.text
    return b, b.follow(got), state, nonce


def session_of(portal: Portal, token: str, account: str = "acme") -> tuple[int, Any]:
    code, data, _ = Api(portal.url, token).call("GET", f"/{account}/session")
    return code, data


# -- OpenID providers ---------------------------------------------------------------------------


@dataclass
class NodeOP:
    issuer: str
    proc: subprocess.Popen[str]
    client_id: str = "fz-portal"
    client_secret: str = "fz-test-secret"


@pytest.fixture(scope="module")
def oidc_op(portal: Portal, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeOP]:
    node = shutil.which("node")
    assert node, "node is required for the OpenID provider tests (Debian nodejs)"
    assert (OIDC_DIR / "node_modules" / "oidc-provider").is_dir(), \
        "run `npm ci` in tests/oidc (scripts/install.sh --test does it)"
    cfg = {"clients": [{"client_id": "fz-portal", "client_secret": "fz-test-secret",
                        "redirect_uris": [portal.url + "/auth/oidc/callback"]}]}
    log = tmp_path_factory.mktemp("op") / "op.log"
    errf = log.open("w")
    proc = subprocess.Popen([node, "server.js", json.dumps(cfg)], cwd=OIDC_DIR, stdout=subprocess.PIPE,
                            stderr=errf, text=True, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("READY "), f"oidc-provider did not start: {line!r}\n{log.read_text()}"
        yield NodeOP(line.split()[1], proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        errf.close()
    assert "server_error" not in log.read_text(), log.read_text()


def _b64url(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).decode().rstrip("=")


@dataclass
class FakeOP:
    """A minimal OpenID provider whose ID tokens the test shapes (``mode``)."""

    port: int
    client_id: str = "fz-fake"
    client_secret: str = "fake-secret"
    key: RSAKey = field(default_factory=lambda: RSAKey.generate_key(2048, parameters={"kid": "k1"}))
    rogue: RSAKey = field(default_factory=lambda: RSAKey.generate_key(2048, parameters={"kid": "k1"}))
    mode: str = "good"
    subject_email: str = "someone@acme.test"
    codes: dict[str, dict[str, Any]] = field(default_factory=dict)
    jwks_fetches: int = 0
    token_requests: list[dict[str, Any]] = field(default_factory=list)

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rotate(self, kid: str) -> None:
        self.key = RSAKey.generate_key(2048, parameters={"kid": kid})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self.discovery)
        app.router.add_get("/jwks", self.jwks)
        app.router.add_get("/authorize", self.authorize)
        app.router.add_post("/token", self.token)
        return app

    async def discovery(self, request: web.Request) -> web.Response:
        return web.json_response({"issuer": self.issuer, "authorization_endpoint": self.issuer + "/authorize",
                                  "token_endpoint": self.issuer + "/token", "jwks_uri": self.issuer + "/jwks",
                                  "response_types_supported": ["code"], "subject_types_supported": ["public"],
                                  "id_token_signing_alg_values_supported": ["RS256"],
                                  "code_challenge_methods_supported": ["S256"]})

    async def jwks(self, request: web.Request) -> web.Response:
        self.jwks_fetches += 1
        return web.json_response(KeySet([self.key]).as_dict(private=False))

    async def authorize(self, request: web.Request) -> web.Response:
        q = request.query
        assert q["client_id"] == self.client_id and q["response_type"] == "code"
        assert q["code_challenge_method"] == "S256" and q["scope"].split()[0] == "openid"
        code = secrets.token_urlsafe(16)
        self.codes[code] = dict(q)
        raise web.HTTPFound(q["redirect_uri"] + "?" + urllib.parse.urlencode({"code": code, "state": q["state"]}))

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        auth = request.headers.get("Authorization", "")
        expected = "Basic " + base64.b64encode(f"{self.client_id}:{self.client_secret}".encode()).decode()
        if auth != expected:
            return web.json_response({"error": "invalid_client"}, status=401)
        req = self.codes.pop(str(form.get("code")), None)
        if req is None:
            return web.json_response({"error": "invalid_grant"}, status=400)
        challenge = _b64url(hashlib.sha256(str(form.get("code_verifier")).encode()).digest())
        self.token_requests.append({"pkce_ok": challenge == req["code_challenge"]})
        if challenge != req["code_challenge"]:
            return web.json_response({"error": "invalid_grant", "error_description": "PKCE failed"}, status=400)
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": "sub-" + self.subject_email, "aud": self.client_id, "iat": now,
                  "exp": now + 300, "nonce": req["nonce"], "email": self.subject_email, "email_verified": True}
        key = self.key
        if self.mode == "wrong_aud":
            claims["aud"] = "someone-else"
        elif self.mode == "wrong_iss":
            claims["iss"] = "http://127.0.0.1:1"
        elif self.mode == "wrong_nonce":
            claims["nonce"] = "not-the-nonce"
        elif self.mode == "expired":
            claims.update(iat=now - 7200, exp=now - 3600)
        elif self.mode == "other_key":
            key = self.rogue
        elif self.mode == "unverified":
            claims["email_verified"] = False
        elif self.mode == "no_email":
            del claims["email"]
        elif self.mode == "unknown_kid":
            key = RSAKey.generate_key(2048, parameters={"kid": "never-published"})
        tok = jwt.encode({"alg": "RS256", "kid": key.kid}, claims, key)
        return web.json_response({"access_token": "at", "token_type": "Bearer", "expires_in": 300, "id_token": tok})


@pytest.fixture(scope="module")
def fake_op() -> Iterator[FakeOP]:
    op = FakeOP(free_port())
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    runner = web.AppRunner(op.app(), access_log=None)

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", op.port).start())
        ready.set()
        loop.run_forever()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert ready.wait(10)
    try:
        yield op
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)
