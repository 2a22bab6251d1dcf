"""The portal's aiohttp application: REST API, OpenAPI, health and metrics, problem+json errors."""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from firezone import __version__
from firezone.portal.errors import Forbidden, PortalError, Unauthorized
from firezone.portal.store import Store
from firezone.portal.web import api

if TYPE_CHECKING:
    from firezone.portal.channels import Hub
    from firezone.portal.web.signin import SigninSettings

log = logging.getLogger(__name__)

STORE = web.AppKey("store", Store)
MAX_BODY = web.AppKey("max_body", int)


class PortalMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("fz_portal_http_requests", "HTTP requests", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("fz_portal_http_request_seconds", "HTTP request latency", ["route"],
                                 registry=self.registry)
        self.decisions = Counter("fz_portal_policy_decisions", "Policy decisions", ["result"], registry=self.registry)
        self.sessions = Gauge("fz_portal_sessions", "Connected WebSocket sessions", ["kind"], registry=self.registry)


METRICS = web.AppKey("metrics", PortalMetrics)


def problem(status: int, title: str, detail: str, errors: list[dict[str, str]] | None = None,
            headers: dict[str, str] | None = None) -> web.Response:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    if errors:
        body["errors"] = errors
    return web.Response(status=status, text=json.dumps(body), content_type="application/problem+json",
                        headers=headers)


def bearer(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return None


@web.middleware
async def errors_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    metrics: PortalMetrics = request.app[METRICS]
    route_name = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    started = time.perf_counter()
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except PortalError as e:
        status = e.status
        headers = {"WWW-Authenticate": 'Bearer realm="fz"'} if isinstance(e, Unauthorized) else None
        return problem(e.status, e.title, e.detail, e.errors, headers)
    except web.HTTPRequestEntityTooLarge:
        status = 413
        return problem(413, "Content Too Large", f"request body is larger than {request.app[MAX_BODY]} bytes")
    except web.HTTPException as e:
        status = e.status
        if e.status >= 400 and request.path.startswith("/api/"):
            return problem(e.status, e.reason, e.text or e.reason)
        raise
    except Exception:
        log.exception("request failed", extra={"route": route_name})
        return problem(500, "Internal Server Error", "the portal hit an unexpected error; see its log")
    finally:
        metrics.requests.labels(request.method, route_name, str(status)).inc()
        metrics.latency.labels(route_name).observe(time.perf_counter() - started)


def _wrap(route: api.Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        store = request.app[STORE]
        info = store.verify_token(bearer(request), ("api",))
        if info.account_id is None:
            raise Unauthorized("this token does not belong to an account")
        acc = store.account(info.account_id)
        if acc["disabled"]:
            raise Forbidden("the account is disabled")
        if info.actor_id is not None:
            actor = store.actor(info.account_id, info.actor_id)
            if actor["disabled"]:
                raise Forbidden("the user this token speaks for is disabled")
        result = await route.handler(api.Ctx(request, store, info))
        if route.status == 204 or result is None:
            return web.Response(status=204)
        return web.json_response(result, status=route.status, dumps=lambda o: json.dumps(o, default=str))
    handler.__name__ = route.handler.__name__
    return handler


_SCHEMAS: dict[str, dict[str, Any]] = {
    "Account": {"type": "object", "properties": {
        "id": {"type": "string"}, "name": {"type": "string"}, "slug": {"type": "string"},
        "search_domain": {"type": ["string", "null"]},
        "upstream_dns": {"type": "array", "items": {"type": "string"}}}},
    "User": {"type": "object", "properties": {
        "id": {"type": "string"}, "type": {"type": "string", "enum": ["user", "admin", "service_account"]},
        "email": {"type": ["string", "null"]}, "name": {"type": "string"}, "disabled": {"type": "boolean"},
        "created_at": {"type": "string", "format": "date-time"}, "groups": {"type": "array", "items": {"type": "string"}}}},
    "Group": {"type": "object", "properties": {"id": {"type": "string"}, "name": {"type": "string"},
                                               "managed": {"type": "boolean"}, "member_count": {"type": "integer"},
                                               "created_at": {"type": "string"}}},
    "Membership": {"type": "object", "properties": {"group": {"$ref": "#/components/schemas/Ref"},
                                                    "user": {"$ref": "#/components/schemas/Ref"}}},
    "Site": {"type": "object", "properties": {"id": {"type": "string"}, "name": {"type": "string"},
                                              "resource_count": {"type": "integer"}, "gateway_count": {"type": "integer"},
                                              "created_at": {"type": "string"}}},
    "Resource": {"type": "object", "properties": {
        "id": {"type": "string"}, "name": {"type": "string"},
        "type": {"type": "string", "enum": ["ip", "cidr", "dns", "internet"]}, "address": {"type": ["string", "null"]},
        "address_description": {"type": ["string", "null"]},
        "filters": {"type": "array", "items": {"type": "object", "properties": {
            "protocol": {"type": "string"}, "ports": {"type": "array", "items": {"type": "string"}}}}},
        "site": {"$ref": "#/components/schemas/Ref"}, "created_at": {"type": "string"}}},
    "Policy": {"type": "object", "properties": {
        "id": {"type": "string"}, "group": {"$ref": "#/components/schemas/Ref"},
        "resource": {"$ref": "#/components/schemas/Ref"}, "description": {"type": ["string", "null"]},
        "conditions": {"type": "array", "items": {"type": "object"}}, "disabled": {"type": "boolean"},
        "created_at": {"type": "string"}}},
    "Explanation": {"type": "object", "properties": {
        "allowed": {"type": "boolean"}, "policy_id": {"type": ["string", "null"]},
        "expires_at": {"type": ["string", "null"]}, "reason": {"type": "string"},
        "violated_properties": {"type": "array", "items": {"type": "string"}},
        "candidates": {"type": "array", "items": {"type": "object"}}}},
    "Token": {"type": "object", "properties": {
        "id": {"type": "string"}, "type": {"type": "string"}, "name": {"type": ["string", "null"]},
        "actor": {"type": ["object", "null"]}, "site": {"type": ["object", "null"]},
        "created_at": {"type": "string"}, "expires_at": {"type": ["string", "null"]},
        "revoked_at": {"type": ["string", "null"]}, "last_used_at": {"type": ["string", "null"]}}},
    "NewToken": {"type": "object", "properties": {"data": {"$ref": "#/components/schemas/Token"},
                                                  "secret": {"type": "string"}}},
    "Decision": {"type": "object", "properties": {
        "id": {"type": "string"}, "at": {"type": "string"}, "result": {"type": "string", "enum": ["allow", "deny"]},
        "reason": {"type": "string"}, "actor": {"type": ["object", "null"]}, "device_id": {"type": ["string", "null"]},
        "resource": {"type": ["object", "null"]}, "gateway_id": {"type": ["string", "null"]},
        "policy_id": {"type": ["string", "null"]}, "violated_properties": {"type": "array", "items": {"type": "string"}},
        "remote_ip": {"type": ["string", "null"]}}},
    "Device": {"type": "object", "properties": {
        "id": {"type": "string"}, "type": {"type": "string", "enum": ["client", "gateway"]},
        "name": {"type": "string"}, "external_id": {"type": "string"}, "actor_id": {"type": ["string", "null"]},
        "site_id": {"type": ["string", "null"]}, "public_key": {"type": ["string", "null"]},
        "ipv4": {"type": "string"}, "ipv6": {"type": "string"}, "online": {"type": "boolean"},
        "last_seen_at": {"type": ["string", "null"]}, "last_seen_remote_ip": {"type": ["string", "null"]},
        "version": {"type": ["string", "null"]}, "created_at": {"type": "string"}}},
    "Relay": {"type": "object", "properties": {
        "id": {"type": "string"}, "name": {"type": "string"}, "ipv4": {"type": ["string", "null"]},
        "ipv6": {"type": ["string", "null"]}, "port": {"type": "integer"}, "remote_ip": {"type": ["string", "null"]},
        "version": {"type": ["string", "null"]}, "online_since": {"type": "string"}}},
    "Ref": {"type": "object", "properties": {"id": {"type": "string"}, "name": {"type": "string"},
                                             "email": {"type": "string"}}},
    "Problem": {"type": "object", "required": ["title", "status", "detail"], "properties": {
        "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
        "detail": {"type": "string"}, "errors": {"type": "array", "items": {"type": "object", "properties": {
            "field": {"type": "string"}, "message": {"type": "string"}}}}}},
}


def openapi_document() -> dict[str, Any]:
    from firezone.portal.web import providers_api  # registers its routes

    _SCHEMAS.setdefault("Provider", providers_api.SCHEMA)
    paths: dict[str, dict[str, Any]] = {}
    problem_ref = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for r in api.ROUTES:
        params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                  for n in _path_params(r.path)]
        params += [{"name": n, "in": "query", "required": False, "description": d, "schema": {"type": "string"}}
                   for n, d in r.query]
        if r.list_:
            params += [{"name": "limit", "in": "query", "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 100}},
                       {"name": "cursor", "in": "query", "required": False, "schema": {"type": "string"}}]
        responses: dict[str, Any] = {}
        if r.status == 204:
            responses["204"] = {"description": "done"}
        else:
            ref = {"$ref": f"#/components/schemas/{r.response}"} if r.response else {"type": "object"}
            if r.list_:
                schema: dict[str, Any] = {"type": "object", "properties": {
                    "data": {"type": "array", "items": ref}, "next_cursor": {"type": ["string", "null"]}}}
            elif r.response == "NewToken":
                schema = ref
            else:
                schema = {"type": "object", "properties": {"data": ref}}
            responses[str(r.status)] = {"description": r.summary,
                                        "content": {"application/json": {"schema": schema}}}
        for code, text in (("400", "malformed request"), ("401", "missing, invalid, expired or revoked token"),
                           ("404", "not found"), ("409", "conflict"), ("413", "body too large"),
                           ("422", "validation failed")):
            responses[code] = {"description": text, "content": problem_ref}
        op: dict[str, Any] = {"summary": r.summary, "operationId": r.handler.__name__, "tags": [r.tag],
                              "parameters": params, "responses": responses}
        if r.body is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": r.body}}}
        paths.setdefault(api.API + r.path, {})[r.method.lower()] = op
    paths["/healthz"] = {"get": {"summary": "Liveness", "operationId": "healthz", "security": [],
                                 "responses": {"200": {"description": "ok"}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "fz portal API", "version": __version__,
                 "description": "Admin API of the fz portal. Authenticate with an API token: "
                                "`Authorization: Bearer <token>`."},
        "servers": [{"url": "/"}],
        "components": {"schemas": _SCHEMAS,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": paths,
    }


def _path_params(path: str) -> list[str]:
    return [seg[1:-1] for seg in path.split("/") if seg.startswith("{") and seg.endswith("}")]


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


async def metrics_handler(request: web.Request) -> web.Response:
    m: PortalMetrics = request.app[METRICS]
    return web.Response(body=generate_latest(m.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi_handler(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


def create_app(store: Store, *, max_body_bytes: int = 1_048_576, hub: "Hub | None" = None,
               signin: SigninSettings | None = None) -> web.Application:
    from firezone.portal.web import providers_api  # registers its routes
    from firezone.portal.web import signin as signin_pages

    _SCHEMAS.setdefault("Provider", providers_api.SCHEMA)
    app = web.Application(middlewares=[errors_middleware], client_max_size=max_body_bytes)
    app[STORE] = store
    app[METRICS] = metrics = PortalMetrics()
    app[MAX_BODY] = max_body_bytes
    if hub is not None:
        from firezone.portal import channels

        hub._on_session_count = lambda kind, n: metrics.sessions.labels(kind).set(n)
        channels.install(app, hub)
    for r in api.ROUTES:
        app.router.add_route(r.method, api.API + r.path, _wrap(r))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/api/openapi.json", openapi_handler)
    signin_pages.install(app, signin)  # last: its /{slug} pages must not shadow the routes above
    return app
