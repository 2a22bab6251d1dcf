"""ApiClient against canned HTTP answers on loopback (protocol edge cases), then the real portal."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from firezone.portal.api_client import ApiClient, ApiError, PortalUnreachable
from tests.cli.conftest import ServedPortal, free_port

Answer = tuple[int, dict[str, str], bytes]


class Canned:
    """A loopback HTTP server whose answers come from ``handler(method, path, headers, body)``."""

    def __init__(self, handler: Callable[[str, str, dict[str, str], bytes], Answer]) -> None:
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def _any(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                outer.requests.append((self.command, self.path, headers, body))
                status, hdrs, payload = handler(self.command, self.path, headers, body)
                self.send_response(status)
                for k, v in hdrs.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PATCH = do_DELETE = _any

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def _json(status: int, doc: Any, ctype: str = "application/json") -> Answer:
    return status, {"Content-Type": ctype}, json.dumps(doc).encode()


@pytest.fixture
def canned() -> Iterator[Callable[[Callable[..., Answer]], Canned]]:
    servers: list[Canned] = []

    def make(handler: Callable[..., Answer]) -> Canned:
        servers.append(Canned(handler))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def test_sends_bearer_token_json_body_and_query(canned: Any) -> None:
    srv = canned(lambda m, p, h, b: _json(201, {"data": {"ok": True}}))
    api = ApiClient(srv.url + "/", "tok-1")
    assert api.post("/users", json={"email": "a@example.com"}, params={"x": "1 2", "skip": None}) == \
        {"data": {"ok": True}}
    method, path, headers, body = srv.requests[0]
    assert (method, path) == ("POST", "/api/v1/users?x=1+2")
    assert headers["authorization"] == "Bearer tok-1"
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"email": "a@example.com"}


def test_base_url_may_already_end_in_api_prefix(canned: Any) -> None:
    srv = canned(lambda m, p, h, b: _json(200, {"data": {}}))
    ApiClient(srv.url + "/api/v1", "t").get("/account")
    assert srv.requests[0][1] == "/api/v1/account"


def test_204_returns_none(canned: Any) -> None:
    srv = canned(lambda m, p, h, b: (204, {}, b""))
    assert ApiClient(srv.url, "t").delete("/users/x") is None


def test_problem_json_becomes_api_error_with_field_errors(canned: Any) -> None:
    problem = {"type": "about:blank", "title": "Unprocessable Content", "status": 422,
               "detail": "address: not an IP, CIDR or DNS name",
               "errors": [{"field": "address", "message": "not an IP, CIDR or DNS name"}]}
    srv = canned(lambda m, p, h, b: _json(422, problem, "application/problem+json"))
    with pytest.raises(ApiError) as e:
        ApiClient(srv.url, "t").post("/resources", json={})
    assert e.value.status == 422
    assert e.value.detail == "address: not an IP, CIDR or DNS name"
    assert e.value.errors == [{"field": "address", "message": "not an IP, CIDR or DNS name"}]
    assert e.value.title == "Unprocessable Content"


def test_problem_without_detail_uses_field_errors(canned: Any) -> None:
    srv = canned(lambda m, p, h, b: _json(422, {"status": 422, "errors": [{"field": "name", "message": "taken"}]},
                                          "application/problem+json"))
    with pytest.raises(ApiError, match="name: taken"):
        ApiClient(srv.url, "t").post("/groups", json={})


def test_non_json_error_says_it_is_not_a_portal(canned: Any) -> None:
    srv = canned(lambda m, p, h, b: (404, {"Content-Type": "text/html"}, b"<h1>nope</h1>"))
    with pytest.raises(ApiError) as e:
        ApiClient(srv.url, "t").get("/users")
    assert e.value.status == 404
    assert "is this an fz portal?" in e.value.detail


def test_non_json_success_is_an_error(canned: Any) -> None:
    srv = canned(lambda m, p, h, b: (200, {"Content-Type": "text/html"}, b"<html></html>"))
    with pytest.raises(ApiError, match="not an fz portal"):
        ApiClient(srv.url, "t").get("/users")


def test_redirect_is_not_followed(canned: Any) -> None:
    srv = canned(lambda m, p, h, b: (302, {"Location": "http://192.0.2.1/steal"}, b""))
    with pytest.raises(ApiError) as e:
        ApiClient(srv.url, "t").get("/users")
    assert e.value.status == 302
    assert len(srv.requests) == 1


def test_connection_refused() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(PortalUnreachable) as e:
        ApiClient(url, "t").get("/users")
    assert e.value.status == 0
    assert str(e.value) == f"cannot reach the portal at {url}: connection refused"


def test_malformed_url() -> None:
    with pytest.raises(PortalUnreachable, match="invalid URL"):
        ApiClient("not a url", "t").get("/users")


def test_iterate_follows_next_cursor_and_respects_limit(canned: Any) -> None:
    pages = {None: ([1, 2], "c1"), "c1": ([3, 4], "c2"), "c2": ([5], None)}

    def handler(m: str, p: str, h: dict[str, str], b: bytes) -> Answer:
        from urllib.parse import parse_qs, urlsplit
        q = parse_qs(urlsplit(p).query)
        items, nxt = pages[q.get("cursor", [None])[0]]
        return _json(200, {"data": [{"n": i} for i in items], "next_cursor": nxt})

    srv = canned(handler)
    api = ApiClient(srv.url, "t")
    assert [x["n"] for x in api.iterate("/users", page_size=2)] == [1, 2, 3, 4, 5]
    assert [x["n"] for x in api.iterate("/users", limit=3, page_size=2)] == [1, 2, 3]
    assert "limit=2" in srv.requests[0][1]


def test_iterate_stops_on_repeated_cursor(canned: Any) -> None:
    srv = canned(lambda m, p, h, b: _json(200, {"data": [{"n": 1}], "next_cursor": "same"}))
    with pytest.raises(ApiError, match="repeated cursor"):
        list(ApiClient(srv.url, "t").iterate("/users"))


# --- against the real portal -------------------------------------------------------------------

def test_real_portal_pagination(served_portal: ServedPortal) -> None:
    api = ApiClient(served_portal.url, served_portal.admin_token())
    tag = uuid.uuid4().hex[:8]
    emails = {f"page{i}-{tag}@example.com" for i in range(5)}
    for e in sorted(emails):
        api.post("/users", json={"email": e})
    paged = [u["email"] for u in api.iterate("/users", page_size=2)]
    assert emails <= set(paged)
    assert len(paged) == len(set(paged))
    one_page = api.get("/users", params={"limit": 500})
    assert sorted(u["email"] for u in one_page["data"]) == sorted(paged)
    assert len(list(api.iterate("/users", limit=3, page_size=2))) == 3


def test_real_portal_rejects_bad_token(served_portal: ServedPortal) -> None:
    with pytest.raises(ApiError) as e:
        ApiClient(served_portal.url, "bogus").get("/account")
    assert e.value.status == 401
