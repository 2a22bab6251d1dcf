"""REST API v1: admin CRUD over the store, described by the route table that also builds OpenAPI.

Every handler is registered through :func:`route`, which records its method, path, summary, request
body schema and response schema; ``/api/openapi.json`` is generated from that table, so the document
cannot drift from the routes.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable

from aiohttp import web

from firezone.portal.domain import policies
from firezone.portal.errors import BadRequest, Forbidden, Invalid, NotFound
from firezone.portal.store import Page, Store, TokenInfo, iso

log = logging.getLogger(__name__)

API = "/api/v1"
Handler = Callable[["Ctx"], Awaitable[Any]]


@dataclass
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    body: dict[str, Any] | None
    response: str | None
    status: int
    query: tuple[tuple[str, str], ...]
    list_: bool


ROUTES: list[Route] = []


def route(method: str, path: str, summary: str, *, tag: str, body: dict[str, Any] | None = None,
          response: str | None = None, status: int = 200, query: tuple[tuple[str, str], ...] = (),
          list_: bool = False) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        ROUTES.append(Route(method, path, fn, summary, tag, body, response, status, query, list_))
        return fn
    return deco


@dataclass
class Ctx:
    """One authenticated API request."""

    request: web.Request
    store: Store
    token: TokenInfo

    @property
    def account_id(self) -> str:
        assert self.token.account_id is not None
        return self.token.account_id

    def param(self, name: str) -> str:
        return self.request.match_info[name]

    def q(self, name: str) -> str | None:
        v = self.request.query.get(name)
        return v if v else None

    @property
    def limit(self) -> int:
        raw = self.request.query.get("limit", "100")
        try:
            n = int(raw)
        except ValueError:
            raise Invalid("limit", "must be an integer between 1 and 500") from None
        if not 1 <= n <= 500:
            raise Invalid("limit", "must be an integer between 1 and 500")
        return n

    @property
    def cursor(self) -> str | None:
        return self.q("cursor")

    async def body(self) -> dict[str, Any]:
        if not self.request.can_read_body:
            return {}
        try:
            raw = await self.request.read()
        except web.HTTPRequestEntityTooLarge:
            raise
        if not raw.strip():
            return {}
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(f"request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise BadRequest("request body must be a JSON object")
        return data


def _str(data: dict[str, Any], key: str, *, required: bool = False) -> str | None:
    v = data.get(key)
    if v is None:
        if required:
            raise Invalid(key, "is required")
        return None
    if not isinstance(v, str):
        raise Invalid(key, "must be a string")
    return v


def _bool(data: dict[str, Any], key: str) -> bool | None:
    v = data.get(key)
    if v is None:
        return None
    if not isinstance(v, bool):
        raise Invalid(key, "must be true or false")
    return v


def _only(data: dict[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(data) - allowed)
    if extra:
        raise Invalid(extra[0], f"unknown field (allowed: {', '.join(sorted(allowed))})")


# -- views ----------------------------------------------------------------------------------------


def user_view(store: Store, row: dict[str, Any], with_groups: bool = True) -> dict[str, Any]:
    out = {"id": row["id"], "type": row["type"], "email": row["email"], "name": row["name"],
           "disabled": bool(row["disabled"]), "created_at": iso(row["created_at"])}
    if with_groups:
        out["groups"] = [g["name"] for g in store.actor_groups(row["id"])]
    return out


def group_view(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "name": row["name"], "managed": bool(row["managed"]),
            "member_count": row.get("member_count", 0), "created_at": iso(row["created_at"])}


def site_view(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "name": row["name"], "resource_count": row.get("resource_count", 0),
            "gateway_count": row.get("gateway_count", 0), "created_at": iso(row["created_at"])}


def resource_view(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "name": row["name"], "type": row["type"], "address": row["address"],
            "address_description": row["address_description"], "filters": row["filters"],
            "site": {"id": row["site_id"], "name": row.get("site_name")}, "created_at": iso(row["created_at"])}


def policy_view(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "group": {"id": row["group_id"], "name": row.get("group_name")},
            "resource": {"id": row["resource_id"], "name": row.get("resource_name")},
            "description": row["description"], "conditions": row["conditions"], "disabled": row["disabled"],
            "created_at": iso(row["created_at"])}


def token_view(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "type": row["type"], "name": row["name"],
            "actor": {"id": row["actor_id"], "email": row.get("actor_email")} if row["actor_id"] else None,
            "site": {"id": row["site_id"], "name": row.get("site_name")} if row["site_id"] else None,
            "created_at": iso(row["created_at"]), "expires_at": iso(row["expires_at"]),
            "revoked_at": iso(row["revoked_at"]), "last_used_at": iso(row["last_used_at"])}


def decision_view(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "at": iso(row["at"]), "result": row["result"], "reason": row["reason"],
            "actor": {"id": row["actor_id"], "email": row["actor_email"]} if row["actor_id"] else None,
            "device_id": row["device_id"],
            "resource": {"id": row["resource_id"], "name": row["resource_name"]} if row["resource_id"] else None,
            "gateway_id": row["gateway_id"], "policy_id": row["policy_id"],
            "violated_properties": row["violated_properties"], "remote_ip": row["remote_ip"]}


def page(p: Page, view: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    return {"data": [view(r) for r in p.rows], "next_cursor": p.next_cursor}


# -- account ----------------------------------------------------------------------------------


def account_view(store: Store, account_id: str) -> dict[str, Any]:
    a = store.account(account_id)
    settings = store.account_settings(account_id)
    return {"id": a["id"], "name": a["name"], "slug": a["slug"],
            "search_domain": settings.get("search_domain"), "upstream_dns": settings.get("upstream_dns", [])}


@route("GET", "/account", "The account this token belongs to", tag="account", response="Account")
async def get_account(c: Ctx) -> Any:
    return {"data": account_view(c.store, c.account_id)}


_ACCOUNT_BODY = {"type": "object", "properties": {
    "search_domain": {"type": ["string", "null"]},
    "upstream_dns": {"type": ["array", "null"], "items": {"type": "string"}}}}


@route("PATCH", "/account", "Change the client settings of the account (search domain, upstream resolvers)",
       tag="account", body=_ACCOUNT_BODY, response="Account")
async def update_account(c: Ctx) -> Any:
    d = await c.body()
    _only(d, {"search_domain", "upstream_dns"})
    c.store.update_account_settings(c.account_id, d)
    return {"data": account_view(c.store, c.account_id)}


# -- users ------------------------------------------------------------------------------------

_USER_BODY = {"type": "object", "required": ["email"], "properties": {
    "email": {"type": "string"}, "name": {"type": "string"},
    "type": {"type": "string", "enum": ["user", "admin", "service_account"]}}}


@route("GET", "/users", "List users", tag="users", response="User", list_=True, query=(("email", "exact email"),))
async def list_users(c: Ctx) -> Any:
    return page(c.store.actors(c.account_id, limit=c.limit, cursor=c.cursor, email=c.q("email")),
                lambda r: user_view(c.store, r))


@route("POST", "/users", "Create a user", tag="users", body=_USER_BODY, response="User", status=201)
async def create_user(c: Ctx) -> Any:
    d = await c.body()
    _only(d, {"email", "name", "type"})
    row = c.store.create_actor(c.account_id, email=_str(d, "email"), name=_str(d, "name"),
                               type=_str(d, "type") or "user")
    return {"data": user_view(c.store, row)}


@route("GET", "/users/{ref}", "Show a user (id or email)", tag="users", response="User")
async def get_user(c: Ctx) -> Any:
    return {"data": user_view(c.store, c.store.actor(c.account_id, c.param("ref")))}


@route("PATCH", "/users/{ref}", "Update a user", tag="users", response="User", body={"type": "object", "properties": {
    "name": {"type": "string"}, "type": {"type": "string"}, "disabled": {"type": "boolean"}}})
async def update_user(c: Ctx) -> Any:
    d = await c.body()
    _only(d, {"name", "type", "disabled"})
    if c.param("ref") in (c.token.actor_id, ) and d.get("disabled") is True:
        raise Forbidden("you cannot disable the user your own token speaks for")
    row = c.store.update_actor(c.account_id, c.param("ref"), name=_str(d, "name"), type=_str(d, "type"),
                               disabled=_bool(d, "disabled"))
    return {"data": user_view(c.store, row)}


@route("DELETE", "/users/{ref}", "Remove a user, their memberships and tokens", tag="users", status=204)
async def delete_user(c: Ctx) -> Any:
    row = c.store.actor(c.account_id, c.param("ref"))
    if row["id"] == c.token.actor_id:
        raise Forbidden("you cannot remove the user your own token speaks for")
    c.store.delete_actor(c.account_id, row["id"])
    return None


# -- groups -----------------------------------------------------------------------------------

_NAME_BODY = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}


@route("GET", "/groups", "List groups", tag="groups", response="Group", list_=True)
async def list_groups(c: Ctx) -> Any:
    return page(c.store.groups(c.account_id, limit=c.limit, cursor=c.cursor), group_view)


@route("POST", "/groups", "Create a group", tag="groups", body=_NAME_BODY, response="Group", status=201)
async def create_group(c: Ctx) -> Any:
    d = await c.body()
    _only(d, {"name"})
    return {"data": group_view(c.store.create_group(c.account_id, _str(d, "name", required=True) or ""))}


@route("GET", "/groups/{ref}", "Show a group (id or name)", tag="groups", response="Group")
async def get_group(c: Ctx) -> Any:
    return {"data": group_view(c.store.group(c.account_id, c.param("ref")))}


@route("PATCH", "/groups/{ref}", "Rename a group", tag="groups", body=_NAME_BODY, response="Group")
async def update_group(c: Ctx) -> Any:
    d = await c.body()
    _only(d, {"name"})
    return {"data": group_view(c.store.rename_group(c.account_id, c.param("ref"), _str(d, "name", required=True) or ""))}


@route("DELETE", "/groups/{ref}", "Remove a group and its policies", tag="groups", status=204)
async def delete_group(c: Ctx) -> Any:
    c.store.delete_group(c.account_id, c.param("ref"))


@route("GET", "/groups/{ref}/members", "List a group's members", tag="groups", response="User", list_=True)
async def list_members(c: Ctx) -> Any:
    return page(c.store.members(c.account_id, c.param("ref"), limit=c.limit, cursor=c.cursor),
                lambda r: user_view(c.store, r, with_groups=False))


@route("POST", "/groups/{ref}/members", "Add a user to a group", tag="groups", status=201, response="Membership",
       body={"type": "object", "required": ["user"], "properties": {"user": {"type": "string"}}})
async def add_member(c: Ctx) -> Any:
    d = await c.body()
    _only(d, {"user"})
    g, u = c.store.add_member(c.account_id, c.param("ref"), _str(d, "user", required=True) or "")
    return {"data": {"group": {"id": g["id"], "name": g["name"]}, "user": {"id": u["id"], "email": u["email"]}}}


@route("DELETE", "/groups/{ref}/members/{user_ref}", "Remove a user from a group", tag="groups", status=204)
async def remove_member(c: Ctx) -> Any:
    c.store.remove_member(c.account_id, c.param("ref"), c.param("user_ref"))


@route("GET", "/memberships", "List memberships", tag="groups", response="Membership", list_=True,
       query=(("group", "group id or name"), ("user", "user id or email")))
async def list_memberships(c: Ctx) -> Any:
    p = c.store.memberships(c.account_id, group=c.q("group"), user=c.q("user"), limit=c.limit, cursor=c.cursor)
    return page(p, lambda r: {"group": {"id": r["group_id"], "name": r["group_name"]},
                              "user": {"id": r["actor_id"], "email": r["actor_email"]}})


# -- sites ------------------------------------------------------------------------------------


@route("GET", "/sites", "List sites", tag="sites", response="Site", list_=True)
async def list_sites(c: Ctx) -> Any:
    return page(c.store.sites(c.account_id, limit=c.limit, cursor=c.cursor), site_view)


@route("POST", "/sites", "Create a site", tag="sites", body=_NAME_BODY, response="Site", status=201)
async def create_site(c: Ctx) -> Any:
    d = await c.body()
    _only(d, {"name"})
    return {"data": site_view(c.store.create_site(c.account_id, _str(d, "name", required=True) or ""))}


@route("GET", "/sites/{ref}", "Show a site (id or name)", tag="sites", response="Site")
async def get_site(c: Ctx) -> Any:
    return {"data": site_view(c.store.site(c.account_id, c.param("ref")))}


@route("PATCH", "/sites/{ref}", "Rename a site", tag="sites", body=_NAME_BODY, response="Site")
async def update_site(c: Ctx) -> Any:
    d = await c.body()
    _only(d, {"name"})
    return {"data": site_view(c.store.rename_site(c.account_id, c.param("ref"), _str(d, "name", required=True) or ""))}


@route("DELETE", "/sites/{ref}", "Remove a site (it must have no resources)", tag="sites", status=204)
async def delete_site(c: Ctx) -> Any:
    c.store.delete_site(c.account_id, c.param("ref"))


# -- resources --------------------------------------------------------------------------------

_FILTER = {"type": "object", "required": ["protocol"], "properties": {
    "protocol": {"type": "string", "enum": ["tcp", "udp", "icmp"]},
    "ports": {"type": "array", "items": {"type": "string"}}}}
_RESOURCE_BODY = {"type": "object", "required": ["name", "site"], "properties": {
    "name": {"type": "string"}, "address": {"type": "string"},
    "type": {"type": "string", "enum": ["ip", "cidr", "dns", "internet"]},
    "address_description": {"type": "string"}, "filters": {"type": "array", "items": _FILTER},
    "site": {"type": "string"}}}
_RESOURCE_FIELDS = {"name", "address", "type", "address_description", "filters", "site"}


@route("GET", "/resources", "List resources", tag="resources", response="Resource", list_=True,
       query=(("site", "site id or name"),))
async def list_resources(c: Ctx) -> Any:
    return page(c.store.resources(c.account_id, site=c.q("site"), limit=c.limit, cursor=c.cursor), resource_view)


@route("POST", "/resources", "Create a resource", tag="resources", body=_RESOURCE_BODY, response="Resource",
       status=201)
async def create_resource(c: Ctx) -> Any:
    d = await c.body()
    _only(d, _RESOURCE_FIELDS)
    return {"data": resource_view(c.store.create_resource(c.account_id, d))}


@route("GET", "/resources/{ref}", "Show a resource (id or name)", tag="resources", response="Resource")
async def get_resource(c: Ctx) -> Any:
    return {"data": resource_view(c.store.resource(c.account_id, c.param("ref")))}


@route("PATCH", "/resources/{ref}", "Update a resource", tag="resources", response="Resource",
       body={**_RESOURCE_BODY, "required": []})
async def update_resource(c: Ctx) -> Any:
    d = await c.body()
    _only(d, _RESOURCE_FIELDS)
    return {"data": resource_view(c.store.update_resource(c.account_id, c.param("ref"), d))}


@route("DELETE", "/resources/{ref}", "Remove a resource and its policies", tag="resources", status=204)
async def delete_resource(c: Ctx) -> Any:
    c.store.delete_resource(c.account_id, c.param("ref"))


# -- policies ---------------------------------------------------------------------------------

_CONDITION = {"type": "object", "required": ["property", "operator", "values"], "properties": {
    "property": {"type": "string", "enum": ["remote_ip", "provider_id", "current_utc_datetime", "client_verified"]},
    "operator": {"type": "string"}, "values": {"type": "array", "items": {"type": "string"}}}}
_POLICY_PROPERTIES: dict[str, Any] = {
    "group": {"type": "string"}, "resource": {"type": "string"}, "description": {"type": "string"},
    "conditions": {"type": "array", "items": _CONDITION}, "disabled": {"type": "boolean"}}
_POLICY_BODY = {"type": "object", "required": ["group", "resource"], "properties": _POLICY_PROPERTIES}


@route("GET", "/policies", "List policies", tag="policies", response="Policy", list_=True,
       query=(("group", "group id or name"), ("resource", "resource id or name")))
async def list_policies(c: Ctx) -> Any:
    return page(c.store.policies(c.account_id, group=c.q("group"), resource=c.q("resource"), limit=c.limit,
                                 cursor=c.cursor), policy_view)


@route("POST", "/policies", "Create a policy: a group may reach a resource", tag="policies", body=_POLICY_BODY,
       response="Policy", status=201)
async def create_policy(c: Ctx) -> Any:
    d = await c.body()
    _only(d, {"group", "resource", "description", "conditions", "disabled"})
    row = c.store.create_policy(c.account_id, group=_str(d, "group", required=True) or "",
                                resource=_str(d, "resource", required=True) or "",
                                description=_str(d, "description"), conditions=d.get("conditions"),
                                disabled=_bool(d, "disabled") or False)
    return {"data": policy_view(row)}


@route("POST", "/policies/explain", "Evaluate the policies for a user and a resource and say why",
       tag="policies", response="Explanation", body={"type": "object", "required": ["user", "resource"], "properties": {
           "user": {"type": "string"}, "resource": {"type": "string"}, "at": {"type": "string", "format": "date-time"},
           "remote_ip": {"type": "string"}, "provider": {"type": "string"}, "client_verified": {"type": "boolean"}}})
async def explain_policy(c: Ctx) -> Any:
    d = await c.body()
    _only(d, {"user", "resource", "at", "remote_ip", "provider", "client_verified"})
    actor = c.store.actor(c.account_id, _str(d, "user", required=True) or "")
    res = c.store.resource(c.account_id, _str(d, "resource", required=True) or "")
    at = datetime.now(timezone.utc)
    if d.get("at") is not None:
        try:
            at = datetime.fromisoformat(str(d["at"]).replace("Z", "+00:00"))
        except ValueError:
            raise Invalid("at", "must be an ISO-8601 date and time, e.g. 2026-11-25T09:00:00Z") from None
        if at.tzinfo is None:
            at = at.replace(tzinfo=timezone.utc)
        at = at.astimezone(timezone.utc)
    remote_ip = _str(d, "remote_ip")
    if remote_ip is not None:
        try:
            remote_ip = str(ipaddress.ip_address(remote_ip))
        except ValueError:
            raise Invalid("remote_ip", f"{remote_ip!r} is not an IP address") from None
    provider_id = None
    if d.get("provider"):
        provider_id = c.store.provider(c.account_id, _str(d, "provider") or "")["id"]
    ctx = policies.EvalContext(now=at, remote_ip=remote_ip, provider_id=provider_id,
                               client_verified=bool(_bool(d, "client_verified")), token_expires_at=None)
    cands = c.store.candidate_policies(actor["id"], res["id"])
    decision = policies.evaluate(cands, ctx)
    by_id = {p.id: p for p in cands}
    groups = {g["id"]: g["name"] for g in c.store.actor_groups(actor["id"])}
    per = dict(decision.per_policy)
    if actor["disabled"]:
        reason = "the user is disabled"
    elif decision.allowed:
        reason = f"policy {decision.policy_id} allows it"
    elif not cands:
        reason = "no policy gives any of the user's groups access to this resource (default deny)"
    else:
        reason = "every candidate policy has a condition that does not hold"
    allowed = decision.allowed and not actor["disabled"]
    return {"data": {
        "allowed": allowed, "policy_id": decision.policy_id if allowed else None,
        "expires_at": decision.expires_at.isoformat().replace("+00:00", "Z") if decision.expires_at and allowed else None,
        "violated_properties": list(decision.violated_properties), "reason": reason,
        "user": {"id": actor["id"], "email": actor["email"]}, "resource": {"id": res["id"], "name": res["name"]},
        "at": at.isoformat().replace("+00:00", "Z"),
        "candidates": [{"policy_id": p.id, "group": groups.get(p.group_id), "description": p.description,
                        "disabled": p.disabled, "violated_properties": list(per.get(p.id, ()))}
                       for p in by_id.values()]}}


@route("GET", "/policies/{id}", "Show a policy", tag="policies", response="Policy")
async def get_policy(c: Ctx) -> Any:
    return {"data": policy_view(c.store.policy(c.account_id, c.param("id")))}


@route("PATCH", "/policies/{id}", "Update a policy", tag="policies", response="Policy",
       body={"type": "object", "properties": {k: v for k, v in _POLICY_PROPERTIES.items()
                                              if k in ("description", "conditions", "disabled")}})
async def update_policy(c: Ctx) -> Any:
    d = await c.body()
    _only(d, {"description", "conditions", "disabled"})
    return {"data": policy_view(c.store.update_policy(c.account_id, c.param("id"), d))}


@route("DELETE", "/policies/{id}", "Remove a policy", tag="policies", status=204)
async def delete_policy(c: Ctx) -> Any:
    c.store.delete_policy(c.account_id, c.param("id"))


# -- tokens -----------------------------------------------------------------------------------


@route("GET", "/tokens", "List tokens (never their secrets)", tag="tokens", response="Token", list_=True,
       query=(("type", "api, client, gateway or relay"),))
async def list_tokens(c: Ctx) -> Any:
    return page(c.store.tokens(c.account_id, type=c.q("type"), limit=c.limit, cursor=c.cursor), token_view)


@route("POST", "/tokens", "Create a token; the secret is returned only here", tag="tokens", response="NewToken",
       status=201, body={"type": "object", "required": ["type"], "properties": {
           "type": {"type": "string", "enum": ["api", "client", "gateway", "relay"]}, "name": {"type": "string"},
           "site": {"type": "string"}, "user": {"type": "string"}, "expires_in": {"type": "integer", "minimum": 1}}})
async def create_token(c: Ctx) -> Any:
    d = await c.body()
    _only(d, {"type", "name", "site", "user", "expires_in"})
    exp = d.get("expires_in")
    if exp is not None and (not isinstance(exp, int) or isinstance(exp, bool)):
        raise Invalid("expires_in", "must be a positive number of seconds")
    row, secret = c.store.create_token(c.account_id, type=_str(d, "type", required=True) or "", name=_str(d, "name"),
                                       actor=_str(d, "user"), site=_str(d, "site"), expires_in=exp)
    return {"data": token_view(row), "secret": secret}


@route("GET", "/tokens/{id}", "Show a token", tag="tokens", response="Token")
async def get_token(c: Ctx) -> Any:
    return {"data": token_view(c.store.token(c.account_id, c.param("id")))}


@route("DELETE", "/tokens/{id}", "Revoke a token", tag="tokens", status=204)
async def revoke_token(c: Ctx) -> Any:
    row = c.store.token(c.account_id, c.param("id"))
    if row["account_id"] is None and c.token.actor_id is None:
        raise NotFound.of("token", c.param("id"))
    c.store.revoke_token(c.account_id, row["id"])


# -- audit ------------------------------------------------------------------------------------


@route("GET", "/audit", "Policy decisions, newest first", tag="audit", response="Decision", list_=True,
       query=(("result", "allow or deny"), ("user", "user id or email"), ("resource", "resource id or name")))
async def list_audit(c: Ctx) -> Any:
    p = c.store.decisions(c.account_id, result=c.q("result"), user=c.q("user"), resource=c.q("resource"),
                          limit=c.limit, cursor=c.cursor)
    return page(p, decision_view)


# -- presence ---------------------------------------------------------------------------------


def _online(c: Ctx) -> set[str]:
    from firezone.portal.channels import HUB

    hub = c.request.app.get(HUB)
    return hub.online_devices() if hub is not None else set()


def device_view(row: dict[str, Any], online: set[str]) -> dict[str, Any]:
    return {"id": row["id"], "type": row["type"], "name": row["name"], "external_id": row["external_id"],
            "actor_id": row["actor_id"], "site_id": row["site_id"], "public_key": row["public_key"],
            "ipv4": row["ipv4"], "ipv6": row["ipv6"], "online": row["id"] in online,
            "last_seen_at": iso(row["last_seen_at"]), "last_seen_remote_ip": row["last_seen_remote_ip"],
            "version": row["last_seen_version"], "created_at": iso(row["created_at"])}


@route("GET", "/devices", "List clients and gateways, with presence", tag="devices", response="Device", list_=True,
       query=(("type", "client or gateway"),))
async def list_devices(c: Ctx) -> Any:
    kind = c.q("type")
    if kind not in (None, "client", "gateway"):
        raise Invalid("type", "must be client or gateway")
    online = _online(c)
    return page(c.store.devices(c.account_id, type=kind, limit=c.limit, cursor=c.cursor),
                lambda r: device_view(r, online))


@route("GET", "/relays", "Relays connected to the portal now", tag="devices", response="Relay", list_=True)
async def list_relays(c: Ctx) -> Any:
    from firezone.portal.channels import HUB

    hub = c.request.app.get(HUB)
    return {"data": hub.relay_list() if hub is not None else [], "next_cursor": None}
