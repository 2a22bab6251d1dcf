"""Sign-in pages: the account page, email codes, OIDC, the client callback, the admin dashboard.

Routes (``{slug}`` is the account slug):

- ``GET /{slug}?as=client|gui-client|headless-client|admin&state=…&nonce=…``: the providers to pick.
- ``POST /{slug}/sign_in/email/{provider}``: mail a one-time code; ``GET|POST …/verify``: check it
  (``GET …/verify?code=…`` is the link in the mail; it works only in the browser that asked).
- ``POST /{slug}/sign_in/oidc/{provider}`` → the provider → ``GET /auth/oidc/callback``.
- success: a client gets a page that sends the browser to ``firezone-fd0020211111://…`` with the
  token fragment (a headless client gets the whole token to copy); an admin gets a session cookie
  and ``/{slug}/admin``.
- ``GET|DELETE /{slug}/session`` with a client token: who it is / revoke it (``fz client whoami|logout``).

Email codes: 6 characters from an alphabet without look-alikes, stored as an argon2 hash, valid
``portal.email_code_ttl`` seconds, 3 attempts, a new code ends the older ones, at most 3 mails per
address per 5 minutes. A request takes at least ``portal.email_response_ms`` and does the same
work whether the address belongs to a user or not (the mail goes out in the background), so
neither the page nor its timing tells who has an account.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any
from urllib.parse import urlencode

import argon2
import jinja2
from aiohttp import web

from firezone import client_auth
from firezone.portal.errors import Conflict, Invalid, NotFound, PortalError, Unauthorized
from firezone.portal.store import DEFAULT_CLIENT_SESSION_S, Store, iso, now_ms
from firezone.portal.web import session as sess
from firezone.portal.web.mailer import Mailer, MailSettings
from firezone.portal.web.oidc import OidcClient, OidcError, ProviderConfig

log = logging.getLogger(__name__)

CODE_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"  # no i, l, o, 0, 1
CODE_LENGTH = 6
CODE_ATTEMPTS = 3
MAILS_PER_WINDOW = 3
MAIL_WINDOW_S = 300
OIDC_FLOW_TTL_S = 600
KINDS = ("client", "gui-client", "headless-client", "admin")
_PARAM = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
_STATIC = {"fz.css": "text/css"}


@dataclass
class SigninSettings:
    mail: MailSettings = field(default_factory=MailSettings)
    email_code_ttl: int = 900
    email_response_ms: int = 800
    external_url: str | None = None
    # OWASP's minimum argon2id profile (m=19 MiB, t=2, p=1): tens of ms per guess at a leaked code hash
    argon2_time_cost: int = 2
    argon2_memory_kib: int = 19 * 1024


@dataclass
class Signin:
    settings: SigninSettings
    mailer: Mailer
    oidc: OidcClient
    hasher: argon2.PasswordHasher
    templates: jinja2.Environment


SIGNIN = web.AppKey("signin", Signin)


def _templates() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.PackageLoader("firezone.portal.web", "templates"),
                              autoescape=jinja2.select_autoescape(["html"], default=True))


def install(app: web.Application, settings: SigninSettings | None = None) -> None:
    """Mount the sign-in and admin pages (after every other route: ``/{slug}`` is a catch-all)."""
    settings = settings or SigninSettings()
    s = Signin(settings, Mailer(settings.mail), OidcClient(),
               argon2.PasswordHasher(time_cost=settings.argon2_time_cost, memory_cost=settings.argon2_memory_kib,
                                     parallelism=1),
               _templates())
    app[SIGNIN] = s

    async def cleanup(app: web.Application) -> Any:
        yield
        await s.mailer.drain()
        await s.oidc.close()

    app.cleanup_ctx.append(cleanup)
    r = app.router
    r.add_get("/static/{name}", static_file)
    r.add_get("/auth/oidc/callback", oidc_callback)
    r.add_get("/{slug}", sign_in_page)
    r.add_post("/{slug}/sign_in/email/{provider}", email_request)
    r.add_get("/{slug}/sign_in/email/{provider}/verify", email_verify_page)
    r.add_post("/{slug}/sign_in/email/{provider}/verify", email_verify)
    r.add_post("/{slug}/sign_in/oidc/{provider}", oidc_begin)
    r.add_get("/{slug}/admin", admin_page)
    r.add_post("/{slug}/admin/groups", admin_add_group)
    r.add_post("/{slug}/admin/sign_out", admin_sign_out)
    r.add_get("/{slug}/session", client_session)
    r.add_delete("/{slug}/session", client_session)


# -- helpers ------------------------------------------------------------------------------------


def _s(request: web.Request) -> Signin:
    return request.app[SIGNIN]


def _store(request: web.Request) -> Store:
    from firezone.portal.web.app import STORE

    return request.app[STORE]


def render(request: web.Request, template: str, status: int = 200, **ctx: Any) -> web.Response:
    html = _s(request).templates.get_template(template).render(**ctx)
    return web.Response(text=html, status=status, content_type="text/html", headers={
        "Cache-Control": "no-store", "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'; style-src 'self'; frame-ancestors 'none'; "
                                   "base-uri 'none'",
        "Referrer-Policy": "no-referrer"})


def message(request: web.Request, title: str, text: str, status: int, *, account: dict[str, Any] | None = None,
            retry: str | None = None, retry_label: str = "Start again") -> web.Response:
    return render(request, "message.html", status, title=title, message=text, account=account, retry=retry,
                  retry_label=retry_label, home=f"/{account['slug']}" if account else None)


def _account(request: web.Request) -> dict[str, Any] | None:
    return _store(request).account_by_slug(request.match_info["slug"])


def _no_account(request: web.Request) -> web.Response:
    return message(request, "No such account", f"There is no account named “{request.match_info['slug']}” "
                   "on this portal. Check the address you were given.", 404)


def _flow_params(data: Any) -> dict[str, str]:
    """``as``, ``state``, ``nonce`` from a query or form, validated; raises ValueError with a plain message."""
    kind = str(data.get("as") or "admin")
    if kind not in KINDS:
        raise ValueError("The sign-in link is broken: unknown client type.")
    out = {"as": kind}
    for name in ("state", "nonce"):
        v = str(data.get(name) or "")
        if v and not _PARAM.match(v):
            raise ValueError(f"The sign-in link is broken: invalid {name}.")
        if v:
            out[name] = v
    if kind in ("client", "gui-client") and ("state" not in out or "nonce" not in out):
        raise ValueError("The sign-in link is incomplete: start the sign-in again from the client "
                         "(fz client login).")
    return out


def see_other(url: str) -> web.Response:
    return web.Response(status=303, headers={"Location": url, "Cache-Control": "no-store"})


def _restart_url(slug: str, params: dict[str, str]) -> str:
    return f"/{slug}?{urlencode(params)}"


def _provider(store: Store, account_id: str, ref: str, type_: str) -> dict[str, Any] | None:
    try:
        p = store.provider(account_id, ref)
    except (NotFound, Invalid):
        return None
    if p["type"] != type_ or p["disabled"]:
        return None
    return p


def _lifetime(provider: dict[str, Any], key: str, default: int) -> int:
    v = provider.get("config", {}).get(key)
    return int(v) if isinstance(v, int) and not isinstance(v, bool) and v > 0 else default


def _external(request: web.Request) -> str:
    """Base URL for the OIDC redirect URI (the provider only accepts the registered one anyway)."""
    return _trusted_base(request) or f"{request.scheme}://{request.host}"


def _trusted_base(request: web.Request) -> str | None:
    """Base URL for links in mails: ``portal.external_url``, else the address the request really hit.

    The Host header alone is not trusted: whoever asks for a code for someone else's address
    could otherwise point the link in that person's mail at a host of their own and collect the
    code. Without ``portal.external_url``, a link is only made when Host names the very socket
    address the connection arrived on (a portal reached directly by IP, as in a lab).
    """
    ext = _s(request).settings.external_url
    if ext:
        return ext.rstrip("/")
    sock = request.transport.get_extra_info("sockname") if request.transport is not None else None
    if not sock or not isinstance(sock, tuple):
        return None
    host, port = str(sock[0]), int(sock[1])
    literal = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"{request.scheme}://{literal}" if request.host == literal else None


async def _form(request: web.Request) -> dict[str, str]:
    data = await request.post()
    return {k: v for k, v in data.items() if isinstance(v, str)}


def _csrf_ok(request: web.Request, form: dict[str, str]) -> bool:
    return sess.check_csrf(request.cookies.get(sess.CSRF_COOKIE), form.get(sess.CSRF_FIELD))


def _csrf_failed(request: web.Request, account: dict[str, Any] | None) -> web.Response:
    return message(request, "Form expired", "This form expired or was sent from another site. "
                   "Reload the page and try again.", 403, account=account,
                   retry=f"/{account['slug']}" if account else None)


def _with_presign_csrf(request: web.Request, template: str, status: int = 200, **ctx: Any) -> web.Response:
    token, fresh = sess.presign_csrf(request)
    resp = render(request, template, status, csrf=token, **ctx)
    if fresh:
        sess.set_cookie(resp, request, sess.CSRF_COOKIE, token, max_age=None,
                        external_url=_s(request).settings.external_url)
    return resp


async def static_file(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in _STATIC:
        raise web.HTTPNotFound()
    body = resources.files("firezone.portal.web").joinpath("static", name).read_bytes()
    return web.Response(body=body, content_type=_STATIC[name], headers={"Cache-Control": "public, max-age=3600"})


# -- the account page ---------------------------------------------------------------------------


async def sign_in_page(request: web.Request) -> web.StreamResponse:
    store = _store(request)
    account = _account(request)
    if account is None:
        return _no_account(request)
    try:
        params = _flow_params(request.query)
    except ValueError as e:
        return message(request, "Cannot sign in", str(e), 400, account=account)
    if account["disabled"]:
        return message(request, "Account disabled", "This account is disabled.", 403, account=account)
    if params["as"] == "admin" and sess.current_session(request, store, account["id"]) is not None:
        raise web.HTTPSeeOther(f"/{account['slug']}/admin")
    providers = [p for p in store.providers(account["id"]) if not p["disabled"]]
    return _with_presign_csrf(request, "sign_in.html", account=account, providers=providers, kind=params["as"],
                              params=params, home=f"/{account['slug']}")


# -- email codes --------------------------------------------------------------------------------


def new_code() -> str:
    return "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))


def normalize_code(text: str) -> str:
    return "".join(c for c in text.lower() if c not in " -\t\r\n")


async def email_request(request: web.Request) -> web.StreamResponse:
    started = time.monotonic()
    store, s = _store(request), _s(request)
    account = _account(request)
    if account is None:
        return _no_account(request)
    form = await _form(request)
    if not _csrf_ok(request, form):
        return _csrf_failed(request, account)
    try:
        params = _flow_params(form)
    except ValueError as e:
        return message(request, "Cannot sign in", str(e), 400, account=account)
    provider = _provider(store, account["id"], request.match_info["provider"], "email")
    restart = _restart_url(account["slug"], params)
    if provider is None or account["disabled"]:
        return message(request, "Cannot sign in", "Sign-in by email is not enabled for this account.", 404,
                       account=account, retry=restart)
    raw_email = form.get("email", "").strip().lower()
    if not re.match(r"^[^@\s\x00-\x1f]+@[^@\s\x00-\x1f]+\.[^@\s\x00-\x1f]+$", raw_email) or len(raw_email) > 320:
        return message(request, "Cannot sign in", "That is not an email address. Go back and check it.", 422,
                       account=account, retry=restart)

    window_start = now_ms() - MAIL_WINDOW_S * 1000
    limited = store.count_email_flows(account["id"], raw_email, window_start) >= MAILS_PER_WINDOW
    resp: web.StreamResponse
    if limited:
        log.info("email sign-in rate limited", extra={"account": account["slug"]})
        resp = message(request, "Too many codes", "Too many sign-in codes were requested for this address. "
                       "Wait a few minutes, then try again.", 429, account=account, retry=restart)
    else:
        store.end_email_flows(account["id"], raw_email)
        code = new_code()
        code_hash = await asyncio.to_thread(s.hasher.hash, code)
        secret = sess.new_secret()
        flow = store.create_sign_in_flow(account["id"], provider_id=provider["id"], secret_hash=sess.hash_secret(secret),
                                         expires_in=s.settings.email_code_ttl, data=params, email=raw_email,
                                         code_hash=code_hash)
        actor = store.actor_by_email(account["id"], raw_email)
        if actor is not None and not actor["disabled"] and actor["type"] != "service_account":
            base = _trusted_base(request)
            link = ""
            if base is None:
                log.warning("sign-in mail without a link: set portal.external_url to the portal's public URL")
            else:
                link = (f"Or open this link in the same browser:\n{base}/{account['slug']}/sign_in/email/"
                        f"{provider['id']}/verify?{urlencode({'code': code})}\n\n")
            minutes = max(1, s.settings.email_code_ttl // 60)
            s.mailer.send_later(raw_email, f"Your sign-in code for {account['name']}: {code}", (
                f"Hello {actor['name']},\n\n"
                f"your code to sign in to {account['name']} is:\n\n    {code}\n\n"
                f"{link}"
                f"The code is valid for {minutes} minutes and can be tried {CODE_ATTEMPTS} times.\n"
                f"If you did not ask for it, ignore this mail.\n"))
        resp = see_other(f"/{account['slug']}/sign_in/email/{provider['id']}/verify")
        sess.set_cookie(resp, request, sess.FLOW_COOKIE, f"{flow['id']}.{secret}",
                        # outlives the code, so a late visitor hears "expired" rather than "unknown"
                        max_age=s.settings.email_code_ttl + 600, external_url=s.settings.external_url)
    # the same floor for every outcome: the timing must not tell whether the address has a user
    left = s.settings.email_response_ms / 1000 - (time.monotonic() - started)
    if left > 0:
        await asyncio.sleep(left)
    return resp


async def email_verify_page(request: web.Request) -> web.StreamResponse:
    store, s = _store(request), _s(request)
    account = _account(request)
    if account is None:
        return _no_account(request)
    if "code" in request.query:
        return await _check_code(request, account, request.query.get("code", ""))
    flow = sess.flow_from_cookie(request, store)
    if flow is None or flow["account_id"] != account["id"] or flow["email"] is None:
        return message(request, "Start again", "This browser has no sign-in in progress. Enter your email "
                       "address again.", 400, account=account, retry=f"/{account['slug']}")
    return _with_presign_csrf(request, "verify.html", account=account, email=flow["email"],
                              provider_id=request.match_info["provider"], home=f"/{account['slug']}",
                              ttl_minutes=max(1, s.settings.email_code_ttl // 60),
                              restart=_restart_url(account["slug"], flow["data"]))


async def email_verify(request: web.Request) -> web.StreamResponse:
    account = _account(request)
    if account is None:
        return _no_account(request)
    form = await _form(request)
    if not _csrf_ok(request, form):
        return _csrf_failed(request, account)
    return await _check_code(request, account, form.get("code", ""))


async def _check_code(request: web.Request, account: dict[str, Any], code: str) -> web.StreamResponse:
    store, s = _store(request), _s(request)
    flow = sess.flow_from_cookie(request, store)
    if (flow is None or flow["account_id"] != account["id"] or flow["email"] is None
            or flow["provider_id"] != request.match_info["provider"]):
        return message(request, "Cannot sign in", "This browser did not ask for this code. Open the link in "
                       "the browser where you entered your email address, or request a new code.", 400,
                       account=account, retry=f"/{account['slug']}")
    restart = _restart_url(account["slug"], flow["data"])
    if flow["used_at"] is not None:
        return message(request, "Code already used", "This code was already used. Request a new one.", 410,
                       account=account, retry=restart)
    if flow["attempts"] >= CODE_ATTEMPTS:
        return message(request, "Too many attempts", "The code was entered wrongly too many times. "
                       "Request a new one.", 429, account=account, retry=restart)
    if flow["expires_at"] <= now_ms():
        return message(request, "Code expired", "This code has expired. Request a new one.", 410,
                       account=account, retry=restart)
    code = normalize_code(code)
    try:
        ok = 0 < len(code) <= 32 and await asyncio.to_thread(s.hasher.verify, flow["code_hash"], code)
    except argon2.exceptions.VerifyMismatchError:
        ok = False
    except argon2.exceptions.Argon2Error:
        ok = False
    actor = store.actor_by_email(account["id"], flow["email"]) if ok else None
    if not ok or actor is None:
        n = store.record_flow_attempt(flow["id"])
        left = CODE_ATTEMPTS - n
        text = ("That code is wrong. " + (f"You can try {left} more time{'s' if left != 1 else ''}."
                                          if left > 0 else "No attempts are left: request a new code."))
        if left > 0:
            again = f"/{account['slug']}/sign_in/email/{flow['provider_id']}/verify"
            return message(request, "Wrong code", text, 401, account=account, retry=again, retry_label="Try again")
        return message(request, "Wrong code", text, 401, account=account, retry=restart)
    if not store.use_flow(flow["id"]):
        return message(request, "Code already used", "This code was already used. Request a new one.", 410,
                       account=account, retry=restart)
    provider = store.provider(account["id"], flow["provider_id"])
    return _complete(request, account, provider, actor, flow["data"])


# -- OIDC ---------------------------------------------------------------------------------------


async def oidc_begin(request: web.Request) -> web.StreamResponse:
    store, s = _store(request), _s(request)
    account = _account(request)
    if account is None:
        return _no_account(request)
    form = await _form(request)
    if not _csrf_ok(request, form):
        return _csrf_failed(request, account)
    try:
        params = _flow_params(form)
    except ValueError as e:
        return message(request, "Cannot sign in", str(e), 400, account=account)
    provider = _provider(store, account["id"], request.match_info["provider"], "oidc")
    restart = _restart_url(account["slug"], params)
    if provider is None or account["disabled"]:
        return message(request, "Cannot sign in", "This sign-in method is not enabled for this account.", 404,
                       account=account, retry=restart)
    cfg = ProviderConfig.from_row(provider["config"])
    try:
        begin = await s.oidc.begin(cfg, _external(request) + "/auth/oidc/callback")
    except OidcError as e:
        return message(request, "Cannot sign in", f"Sign-in with {provider['name']} failed: {e}.", 502,
                       account=account, retry=restart)
    secret = sess.new_secret()
    flow = store.create_sign_in_flow(account["id"], provider_id=provider["id"], secret_hash=sess.hash_secret(secret),
                                     expires_in=OIDC_FLOW_TTL_S, data={**params, "oidc_state": begin.state,
                                                                       "verifier": begin.verifier,
                                                                       "oidc_nonce": begin.nonce})
    resp = see_other(begin.url)
    sess.set_cookie(resp, request, sess.FLOW_COOKIE, f"{flow['id']}.{secret}", max_age=OIDC_FLOW_TTL_S,
                    external_url=s.settings.external_url)
    return resp


async def oidc_callback(request: web.Request) -> web.StreamResponse:
    store, s = _store(request), _s(request)
    flow = sess.flow_from_cookie(request, store)
    if flow is None or flow["email"] is not None or "oidc_state" not in flow["data"]:
        return message(request, "Cannot sign in", "This browser has no sign-in in progress (it expired, or "
                       "it was started in another browser). Start again from the sign-in page.", 400)
    try:
        account = store.account(flow["account_id"])
    except NotFound:
        return message(request, "Cannot sign in", "The account of this sign-in no longer exists.", 404)
    data = flow["data"]
    restart = _restart_url(account["slug"], {k: v for k, v in data.items() if k in ("as", "state", "nonce")})

    def fail(text: str, status: int = 401) -> web.Response:
        resp = message(request, "Cannot sign in", text, status, account=account, retry=restart)
        sess.clear_cookie(resp, sess.FLOW_COOKIE)
        return resp

    if not client_auth.state_matches(str(data["oidc_state"]), request.query.get("state", "")):
        return fail("The answer from the identity provider does not belong to this sign-in (state mismatch). "
                    "Start again.")
    if flow["used_at"] is not None:
        return fail("This sign-in was already completed. Start again.", 410)
    if flow["expires_at"] <= now_ms():
        return fail("This sign-in took too long and expired. Start again.", 410)
    if "error" in request.query:
        why = request.query.get("error_description") or request.query.get("error")
        return fail(f"The identity provider refused the sign-in: {why}.")
    code = request.query.get("code")
    if not code:
        return fail("The identity provider sent no authorization code.", 400)
    try:
        provider = store.provider(account["id"], flow["provider_id"])
    except NotFound:
        return fail("This sign-in method was removed.", 404)
    if provider["disabled"]:
        return fail("This sign-in method is disabled.", 403)
    cfg = ProviderConfig.from_row(provider["config"])
    iss = request.query.get("iss")
    if iss is not None and iss.rstrip("/") != cfg.issuer:
        # RFC 9207 §2.4: an answer naming another issuer is a mix-up attack
        return fail("The answer came from another identity provider than the one this sign-in started with.")
    if not store.use_flow(flow["id"]):
        return fail("This sign-in was already completed. Start again.", 410)
    try:
        id_token = await s.oidc.exchange(cfg, code=code, verifier=str(data["verifier"]),
                                         redirect_uri=_external(request) + "/auth/oidc/callback")
        ident = await s.oidc.verify(cfg, id_token, nonce=str(data["oidc_nonce"]))
    except OidcError as e:
        log.info("OIDC sign-in failed", extra={"account": account["slug"], "provider": provider["name"],
                                                "reason": str(e)})
        return fail(f"Sign-in with {provider['name']} failed: {e}.")
    if not ident.email:
        return fail(f"{provider['name']} did not tell us your email address (the email claim is missing).")
    if ident.email_verified is False:
        return fail(f"{provider['name']} says your email address {ident.email} is not verified.")
    actor = store.actor_by_email(account["id"], ident.email)
    if actor is None:
        if not provider["config"].get("create_users"):
            return fail(f"There is no user {ident.email} in {account['name']}. Ask an admin to add you.", 403)
        try:
            actor = store.create_actor(account["id"], email=ident.email, name=ident.name or None, type="user")
        except PortalError as e:
            return fail(f"Could not create your user: {e.detail}.", 422)
        log.info("user created at first OIDC sign-in", extra={"account": account["slug"], "actor_id": actor["id"]})
    resp = _complete(request, account, provider, actor, data)
    return resp


# -- completing a sign-in -----------------------------------------------------------------------


def _complete(request: web.Request, account: dict[str, Any], provider: dict[str, Any], actor: dict[str, Any],
              data: dict[str, Any]) -> web.StreamResponse:
    store, s = _store(request), _s(request)
    kind = str(data.get("as") or "admin")
    params = {k: v for k, v in data.items() if k in ("as", "state", "nonce")}
    restart = _restart_url(account["slug"], params)
    resp: web.StreamResponse
    if actor["disabled"]:
        resp = message(request, "Cannot sign in", "Your user is disabled. Ask an admin.", 403, account=account,
                       retry=restart)
    elif kind == "admin":
        if actor["type"] != "admin":
            resp = message(request, "Admins only", "Only admins can sign in to the portal. Users sign in from "
                           "the fz client (fz client login).", 403, account=account)
        else:
            cookie, lifetime = sess.start_session(
                store, account_id=account["id"], actor_id=actor["id"], provider_id=provider["id"],
                lifetime_s=_lifetime(provider, "portal_session_lifetime", sess.DEFAULT_PORTAL_SESSION_S),
                remote_ip=request.remote, user_agent=request.headers.get("User-Agent"))
            resp = see_other(f"/{account['slug']}/admin")
            sess.set_cookie(resp, request, sess.SESSION_COOKIE, cookie, max_age=lifetime,
                            external_url=s.settings.external_url)
            log.info("admin signed in to the portal", extra={"account": account["slug"], "actor_id": actor["id"]})
    else:
        headless = kind == "headless-client"
        row, text = store.create_token(
            account["id"], type="client", actor=actor["id"], provider_id=provider["id"],
            expires_in=_lifetime(provider, "client_session_lifetime", DEFAULT_CLIENT_SESSION_S),
            name=f"{provider['name']} sign-in" + (" (headless)" if headless else ""),
            nonce="" if headless else str(data["nonce"]))
        log.info("client signed in", extra={"account": account["slug"], "actor_id": actor["id"],
                                             "token_id": row["id"], "provider": provider["name"]})
        if headless:
            resp = render(request, "signed_in.html", account=account, actor_name=actor["name"], token=text,
                          callback=None, expires=iso(row["expires_at"]), home=f"/{account['slug']}")
        else:
            cb = client_auth.callback_url(fragment=text, actor_name=actor["name"], account_slug=account["slug"],
                                          account_name=account["name"], state=str(data.get("state", "")),
                                          provider_identifier=provider["id"])
            resp = render(request, "signed_in.html", account=account, actor_name=actor["name"], callback=cb,
                          token=None, expires=iso(row["expires_at"]), home=f"/{account['slug']}")
    sess.clear_cookie(resp, sess.FLOW_COOKIE)
    return resp


# -- admin pages --------------------------------------------------------------------------------


def _admin(request: web.Request) -> tuple[dict[str, Any], sess.WebSession, dict[str, Any]] | web.StreamResponse:
    store = _store(request)
    account = _account(request)
    if account is None:
        return _no_account(request)
    ws = sess.current_session(request, store, account["id"])
    if ws is None:
        if request.method == "GET":
            raise web.HTTPSeeOther(f"/{account['slug']}?as=admin")
        return message(request, "Signed out", "Your session ended. Sign in again.", 401, account=account,
                       retry=f"/{account['slug']}?as=admin")
    try:
        actor = store.actor(account["id"], ws.row["actor_id"])
    except NotFound:
        return message(request, "Signed out", "Your user no longer exists.", 401, account=account)
    if actor["type"] != "admin" or actor["disabled"] or account["disabled"]:
        return message(request, "Admins only", "Only admins can use the portal. Users sign in from the fz "
                       "client.", 403, account=account)
    return account, ws, actor


def _dashboard(request: web.Request, account: dict[str, Any], ws: sess.WebSession, actor: dict[str, Any],
               status: int = 200, **extra: Any) -> web.Response:
    store = _store(request)
    aid = account["id"]
    decisions = store.decisions(aid, limit=20).rows
    for d in decisions:
        d["at"] = iso(d["at"])
    return render(request, "admin.html", status, account=account, actor=actor, csrf=ws.csrf,
                  home=f"/{account['slug']}/admin", users=store.actors(aid, limit=200).rows,
                  groups=store.groups(aid, limit=200).rows, resources=store.resources(aid, limit=200).rows,
                  policies=store.policies(aid, limit=200).rows, decisions=decisions, **extra)


async def admin_page(request: web.Request) -> web.StreamResponse:
    got = _admin(request)
    if isinstance(got, web.StreamResponse):
        return got
    account, ws, actor = got
    notice = {"group-added": "Group added."}.get(request.query.get("done", ""))
    return _dashboard(request, account, ws, actor, notice=notice)


async def admin_add_group(request: web.Request) -> web.StreamResponse:
    got = _admin(request)
    if isinstance(got, web.StreamResponse):
        return got
    account, ws, actor = got
    form = await _form(request)
    if not sess.check_csrf(ws.csrf, form.get(sess.CSRF_FIELD)):
        return _csrf_failed(request, account)
    try:
        _store(request).create_group(account["id"], form.get("name", ""))
    except (Invalid, Conflict) as e:
        return _dashboard(request, account, ws, actor, 422, error=f"Could not add the group: {e.detail}")
    raise web.HTTPSeeOther(f"/{account['slug']}/admin?done=group-added")


async def admin_sign_out(request: web.Request) -> web.StreamResponse:
    got = _admin(request)
    if isinstance(got, web.StreamResponse):
        return got
    account, ws, _actor = got
    form = await _form(request)
    if not sess.check_csrf(ws.csrf, form.get(sess.CSRF_FIELD)):
        return _csrf_failed(request, account)
    _store(request).revoke_web_session(ws.row["id"])
    resp = see_other(f"/{account['slug']}?as=admin")
    sess.clear_cookie(resp, sess.SESSION_COOKIE)
    return resp


# -- the client's own session (JSON) ------------------------------------------------------------


async def client_session(request: web.Request) -> web.StreamResponse:
    """``GET``: who this client token speaks for; ``DELETE``: revoke it (sign out)."""
    from firezone.portal.web.app import bearer

    store = _store(request)
    account = _account(request)
    if account is None:
        raise NotFound.of("account", request.match_info["slug"])
    info = store.verify_token(bearer(request), ("client",))
    if not hmac.compare_digest(str(info.account_id), account["id"]):
        raise Unauthorized("this token belongs to another account")
    if request.method == "DELETE":
        store.revoke_token(account["id"], info.id)
        log.info("client signed out", extra={"account": account["slug"], "token_id": info.id})
        return web.Response(status=204)
    actor = store.actor(account["id"], info.actor_id or "")
    provider = None
    if info.provider_id:
        try:
            provider = store.provider(account["id"], info.provider_id)["name"]
        except NotFound:
            provider = None
    return web.json_response({"data": {
        "account": {"id": account["id"], "slug": account["slug"], "name": account["name"]},
        "actor": {"id": actor["id"], "name": actor["name"], "email": actor["email"], "type": actor["type"]},
        "token": {"id": info.id, "expires_at": iso(info.expires_at), "provider": provider}}})
