"""A small synchronous client for the portal's REST API (docs/api.md), on urllib.

Synchronous and dependency-free on purpose: the admin CLI makes one to a few requests per run
and must start instantly, so no event loop and no aiohttp import. Every failure surfaces as an
:class:`ApiError` (``status`` 0 when the portal could not be reached at all).
"""

from __future__ import annotations

import json
import logging
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from http.client import HTTPException
from typing import Any

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
# docs/api.md: list endpoints accept limit 1..500.
MAX_PAGE = 500
DEFAULT_TIMEOUT = 30.0


class ApiError(Exception):
    """The portal refused a request (``status`` >= 400) or could not be reached (``status`` 0)."""

    def __init__(self, status: int, detail: str, errors: list[dict[str, Any]] | None = None,
                 title: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = errors or []
        self.title = title

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.detail!r}, {self.errors!r})"


class PortalUnreachable(ApiError):
    """No HTTP answer: connection refused, DNS failure, timeout, malformed URL."""

    def __init__(self, base_url: str, reason: str) -> None:
        super().__init__(0, f"cannot reach the portal at {base_url}: {reason}")
        self.base_url = base_url
        self.reason = reason


class ApiClient:
    """``get/post/patch/delete(path, json=, params=)`` against ``base_url`` + ``/api/v1``."""

    def __init__(self, base_url: str, token: str | None, *, timeout: float = DEFAULT_TIMEOUT,
                 user_agent: str = "fz-admin") -> None:
        base = base_url.strip().rstrip("/")
        base = base.removesuffix(API_PREFIX)
        self.base_url = base
        self.token = token
        self.timeout = timeout
        self.user_agent = user_agent
        self._opener = urllib.request.build_opener(_NoRedirect)

    def get(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, json: Any = None, params: Mapping[str, Any] | None = None) -> Any:
        return self.request("POST", path, json=json, params=params)

    def patch(self, path: str, json: Any = None, params: Mapping[str, Any] | None = None) -> Any:
        return self.request("PATCH", path, json=json, params=params)

    def delete(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        return self.request("DELETE", path, params=params)

    def iterate(self, path: str, params: Mapping[str, Any] | None = None, *,
                limit: int | None = None, page_size: int = MAX_PAGE) -> Iterator[dict[str, Any]]:
        """Yield every item of a list endpoint, following ``next_cursor`` (at most ``limit`` items)."""
        query = {k: v for k, v in (params or {}).items() if v is not None}
        remaining = limit
        cursor: str | None = None
        seen: set[str] = set()
        while True:
            size = page_size if remaining is None else max(1, min(page_size, remaining))
            page = self.get(path, {**query, "limit": size, **({"cursor": cursor} if cursor else {})})
            items = page.get("data") if isinstance(page, dict) else None
            if not isinstance(items, list):
                raise ApiError(0, f"unexpected answer from the portal for {path}: no data list")
            for item in items:
                yield item
                if remaining is not None:
                    remaining -= 1
                    if remaining <= 0:
                        return
            cursor = page.get("next_cursor")
            if not cursor or not items:
                return
            if cursor in seen:
                # A portal that hands back the same cursor twice would loop us forever.
                raise ApiError(0, f"portal returned a repeated cursor for {path}")
            seen.add(cursor)

    def url(self, path: str, params: Mapping[str, Any] | None = None) -> str:
        if not path.startswith("/"):
            path = "/" + path
        url = self.base_url + API_PREFIX + path
        query = {k: _param(v) for k, v in (params or {}).items() if v is not None}
        if query:
            url += "?" + urllib.parse.urlencode(query)
        return url

    def request(self, method: str, path: str, *, json: Any = None,
                params: Mapping[str, Any] | None = None) -> Any:
        """Send one request; returns the parsed JSON body (None for 204) or raises ApiError."""
        url = self.url(path, params)
        headers = {"Accept": "application/json", "User-Agent": self.user_agent}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        body = None
        if json is not None:
            body = _json_dumps(json)
            headers["Content-Type"] = "application/json"
        try:
            req = urllib.request.Request(url, data=body, headers=headers, method=method)
        except ValueError as e:
            raise PortalUnreachable(self.base_url, f"invalid URL ({e})") from None
        log.debug("portal request", extra={"method": method, "path": path})
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                status = resp.status
                raw = resp.read()
                ctype = resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            try:
                raw = e.read()
            except (OSError, HTTPException):
                raw = b""
            raise _error_from(e.code, e.reason, e.headers.get("Content-Type", "") if e.headers else "",
                              raw, self.base_url) from None
        except urllib.error.URLError as e:
            raise PortalUnreachable(self.base_url, _reason(e.reason)) from None
        except (OSError, HTTPException) as e:
            raise PortalUnreachable(self.base_url, _reason(e)) from None
        except ValueError as e:
            raise PortalUnreachable(self.base_url, f"invalid URL ({e})") from None
        if status == 204 or not raw:
            return None
        if "json" not in ctype:
            raise ApiError(status, f"the server at {self.base_url} is not an fz portal "
                                   f"(HTTP {status}, {ctype or 'no content type'})")
        try:
            return _json_loads(raw)
        except ValueError:
            raise ApiError(status, f"the portal at {self.base_url} sent invalid JSON") from None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # Following a redirect would re-send the bearer token to wherever it points.
    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> None:
        return None


def _param(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _json_dumps(v: Any) -> bytes:
    return json.dumps(v, separators=(",", ":")).encode()


def _json_loads(raw: bytes) -> Any:
    return json.loads(raw.decode("utf-8"))


def _reason(r: Any) -> str:
    if isinstance(r, ConnectionRefusedError):
        return "connection refused"
    if isinstance(r, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(r, socket.gaierror):
        return f"cannot resolve host ({r.strerror})"
    if isinstance(r, OSError) and r.strerror:
        return r.strerror
    return str(r) or type(r).__name__


def _error_from(status: int, reason: str, ctype: str, raw: bytes, base_url: str) -> ApiError:
    doc: Any = None
    if "json" in ctype and raw:
        try:
            doc = _json_loads(raw)
        except ValueError:
            doc = None
    if isinstance(doc, dict):
        errors = doc.get("errors") if isinstance(doc.get("errors"), list) else []
        title = doc.get("title") if isinstance(doc.get("title"), str) else None
        detail = doc.get("detail")
        if not isinstance(detail, str) or not detail:
            if errors:
                detail = "; ".join(f"{e.get('field')}: {e.get('message')}" for e in errors
                                   if isinstance(e, dict))
            else:
                detail = title or f"HTTP {status} {reason}"
        return ApiError(status, detail, errors, title)
    if status == 401:
        return ApiError(status, "unauthorized")
    return ApiError(status, f"the server at {base_url} answered HTTP {status} {reason} "
                            "(is this an fz portal?)")
