"""REST API v1: sign-in providers of the account (email codes, OIDC). Secrets are never returned."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from firezone.portal.errors import Invalid
from firezone.portal.store import DEFAULT_CLIENT_SESSION_S, iso
from firezone.portal.web.api import Ctx, _only, _str, route
from firezone.portal.web.session import DEFAULT_PORTAL_SESSION_S

# Firezone's bounds for session lifetimes (seconds)
CLIENT_SESSION_RANGE = (3600, 90 * 86400)
PORTAL_SESSION_RANGE = (300, 86400)

_BODY = {"type": "object", "required": ["type", "name"], "properties": {
    "type": {"type": "string", "enum": ["oidc"]}, "name": {"type": "string"},
    "issuer": {"type": "string", "format": "uri"}, "client_id": {"type": "string"},
    "client_secret": {"type": "string"}, "create_users": {"type": "boolean"},
    "client_session_lifetime": {"type": "integer"}, "portal_session_lifetime": {"type": "integer"}}}
_PATCH = {"type": "object", "properties": {
    "disabled": {"type": "boolean"}, "create_users": {"type": "boolean"}, "client_secret": {"type": "string"},
    "client_session_lifetime": {"type": "integer"}, "portal_session_lifetime": {"type": "integer"}}}

SCHEMA: dict[str, Any] = {"type": "object", "properties": {
    "id": {"type": "string"}, "name": {"type": "string"}, "type": {"type": "string", "enum": ["email", "oidc"]},
    "disabled": {"type": "boolean"}, "issuer": {"type": ["string", "null"]}, "client_id": {"type": ["string", "null"]},
    "create_users": {"type": "boolean"}, "client_session_lifetime": {"type": "integer"},
    "portal_session_lifetime": {"type": "integer"}, "created_at": {"type": "string"}}}


def provider_view(row: dict[str, Any]) -> dict[str, Any]:
    cfg = row.get("config") or {}
    return {"id": row["id"], "name": row["name"], "type": row["type"], "disabled": bool(row["disabled"]),
            "issuer": cfg.get("issuer"), "client_id": cfg.get("client_id"),
            "create_users": bool(cfg.get("create_users", False)),
            "client_session_lifetime": int(cfg.get("client_session_lifetime") or DEFAULT_CLIENT_SESSION_S),
            "portal_session_lifetime": int(cfg.get("portal_session_lifetime") or DEFAULT_PORTAL_SESSION_S),
            "created_at": iso(row["created_at"])}


def _issuer(value: str | None) -> str:
    if not value:
        raise Invalid("issuer", "is required for an OIDC provider")
    parts = urlsplit(value.strip())
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise Invalid("issuer", "must be an https:// URL")
    if parts.scheme == "http" and parts.hostname not in ("localhost", "127.0.0.1", "::1"):
        raise Invalid("issuer", "must be an https:// URL (plain http only on loopback, for testing)")
    if parts.query or parts.fragment:
        raise Invalid("issuer", "must not carry a query or fragment")
    return value.strip().rstrip("/")


def _lifetime(d: dict[str, Any], key: str, bounds: tuple[int, int]) -> int | None:
    v = d.get(key)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not bounds[0] <= v <= bounds[1]:
        raise Invalid(key, f"must be a number of seconds between {bounds[0]} and {bounds[1]}")
    return v


def _flag(d: dict[str, Any], key: str) -> bool | None:
    v = d.get(key)
    if v is not None and not isinstance(v, bool):
        raise Invalid(key, "must be true or false")
    return v


@route("GET", "/providers", "List sign-in providers (never their secrets)", tag="providers", response="Provider",
       list_=True)
async def list_providers(c: Ctx) -> Any:
    return {"data": [provider_view(r) for r in c.store.providers(c.account_id)], "next_cursor": None}


@route("POST", "/providers", "Add an OIDC sign-in provider", tag="providers", body=_BODY, response="Provider",
       status=201)
async def create_provider(c: Ctx) -> Any:
    d = await c.body()
    _only(d, set(_BODY["properties"]))
    if _str(d, "type", required=True) != "oidc":
        raise Invalid("type", "only oidc providers can be added (every account has one email provider)")
    client_id = _str(d, "client_id", required=True) or ""
    secret = _str(d, "client_secret", required=True) or ""
    if not client_id.strip():
        raise Invalid("client_id", "must not be empty")
    if not secret:
        raise Invalid("client_secret", "must not be empty")
    cfg: dict[str, Any] = {"issuer": _issuer(_str(d, "issuer", required=True)), "client_id": client_id.strip(),
                           "client_secret": secret, "create_users": bool(_flag(d, "create_users"))}
    for key, bounds in (("client_session_lifetime", CLIENT_SESSION_RANGE),
                        ("portal_session_lifetime", PORTAL_SESSION_RANGE)):
        v = _lifetime(d, key, bounds)
        if v is not None:
            cfg[key] = v
    row = c.store.create_provider(c.account_id, type="oidc", name=_str(d, "name", required=True) or "", config=cfg)
    return {"data": provider_view(row)}


@route("GET", "/providers/{ref}", "Show a sign-in provider (id or name)", tag="providers", response="Provider")
async def get_provider(c: Ctx) -> Any:
    return {"data": provider_view(c.store.provider(c.account_id, c.param("ref")))}


@route("PATCH", "/providers/{ref}", "Change a provider: enable/disable, user creation, secret, session lifetimes",
       tag="providers", body=_PATCH, response="Provider")
async def update_provider(c: Ctx) -> Any:
    d = await c.body()
    _only(d, set(_PATCH["properties"]))
    row = c.store.provider(c.account_id, c.param("ref"))
    cfg = dict(row["config"])
    if (cu := _flag(d, "create_users")) is not None:
        if row["type"] != "oidc":
            raise Invalid("create_users", "only OIDC providers create users")
        cfg["create_users"] = cu
    if (sec := _str(d, "client_secret")) is not None:
        if row["type"] != "oidc" or not sec:
            raise Invalid("client_secret", "only OIDC providers have a (non-empty) client secret")
        cfg["client_secret"] = sec
    for key, bounds in (("client_session_lifetime", CLIENT_SESSION_RANGE),
                        ("portal_session_lifetime", PORTAL_SESSION_RANGE)):
        v = _lifetime(d, key, bounds)
        if v is not None:
            cfg[key] = v
    row = c.store.update_provider(c.account_id, row["id"], config=cfg, disabled=_flag(d, "disabled"))
    return {"data": provider_view(row)}


@route("DELETE", "/providers/{ref}", "Remove a sign-in provider", tag="providers", status=204)
async def delete_provider(c: Ctx) -> Any:
    c.store.delete_provider(c.account_id, c.param("ref"))
