"""Browser state of the portal pages: admin sessions, sign-ins in progress, CSRF tokens.

Cookies carry ``<row id>.<secret>``; the database keeps only SHA-256 of the secret (the secret is
32 random bytes, so a plain hash is enough). Cookies are HttpOnly, SameSite=Lax (the OIDC callback
is a top-level GET from the provider, which Lax still lets through) and Secure when the portal is
reached over TLS.

CSRF: a form posted by a signed-in admin carries a token derived from the session secret; a sign-in
form (no session yet) carries the value of a separate random ``fz_csrf`` cookie (double submit).
Either way a page of another origin can neither read nor forge it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from firezone.portal.store import Store, now_ms

SESSION_COOKIE = "fz_session"
FLOW_COOKIE = "fz_flow"
CSRF_COOKIE = "fz_csrf"
CSRF_FIELD = "csrf_token"
DEFAULT_PORTAL_SESSION_S = 8 * 3600


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def split_cookie(value: str | None) -> tuple[str, str] | None:
    if not value or "." not in value or len(value) > 200:
        return None
    rid, _, secret = value.partition(".")
    return (rid, secret) if rid and secret else None


def is_secure(request: web.Request, external_url: str | None) -> bool:
    return request.secure or bool(external_url and external_url.lower().startswith("https://"))


def set_cookie(resp: web.StreamResponse, request: web.Request, name: str, value: str, *,
               max_age: int | None, external_url: str | None) -> None:
    resp.set_cookie(name, value, max_age=max_age, path="/", httponly=True, samesite="Lax",
                    secure=is_secure(request, external_url))


def clear_cookie(resp: web.StreamResponse, name: str) -> None:
    resp.del_cookie(name, path="/")


@dataclass(frozen=True)
class WebSession:
    row: dict[str, Any]
    secret: str

    @property
    def csrf(self) -> str:
        return session_csrf(self.secret)


def session_csrf(secret: str) -> str:
    return hmac.new(secret.encode(), b"fz csrf", hashlib.sha256).hexdigest()


def start_session(store: Store, *, account_id: str, actor_id: str, provider_id: str | None,
                  lifetime_s: int, remote_ip: str | None, user_agent: str | None) -> tuple[str, int]:
    """Create the session row; returns the cookie value and its lifetime."""
    secret = new_secret()
    row = store.create_web_session(account_id, actor_id=actor_id, provider_id=provider_id,
                                   secret_hash=hash_secret(secret), expires_in=lifetime_s,
                                   remote_ip=remote_ip, user_agent=user_agent)
    return f"{row['id']}.{secret}", lifetime_s


def current_session(request: web.Request, store: Store, account_id: str) -> WebSession | None:
    """The live session of this browser for this account, or None."""
    parts = split_cookie(request.cookies.get(SESSION_COOKIE))
    if parts is None:
        return None
    row = store.web_session(parts[0])
    if row is None or not hmac.compare_digest(row["secret_hash"], hash_secret(parts[1])):
        return None
    if row["revoked_at"] is not None or row["expires_at"] <= now_ms() or row["account_id"] != account_id:
        return None
    return WebSession(row, parts[1])


def flow_from_cookie(request: web.Request, store: Store) -> dict[str, Any] | None:
    """The sign-in in progress that this browser started, or None."""
    parts = split_cookie(request.cookies.get(FLOW_COOKIE))
    if parts is None:
        return None
    row = store.sign_in_flow(parts[0])
    if row is None or not hmac.compare_digest(row["secret_hash"], hash_secret(parts[1])):
        return None
    return row


def presign_csrf(request: web.Request) -> tuple[str, bool]:
    """The double-submit CSRF value of this browser; True when the cookie must be (re)set."""
    v = request.cookies.get(CSRF_COOKIE)
    if v and 20 <= len(v) <= 100:
        return v, False
    return secrets.token_urlsafe(24), True


def check_csrf(expected: str | None, presented: Any) -> bool:
    if not expected or not isinstance(presented, str) or not presented:
        return False
    return hmac.compare_digest(expected.encode(), presented.encode())
