"""The REST API against a real `fz portal serve` process on a free loopback port."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from typing import Any

import pytest

from tests.cli.conftest import FZ, ServedPortal
from tests.portal_api import Api

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def api(served_portal: ServedPortal) -> Api:
    return Api(served_portal.url + "/api/v1", served_portal.admin_token())


@pytest.fixture(scope="module")
def other_account(served_portal: ServedPortal) -> Api:
    """A second account in the same portal, with its own admin token."""
    data_dir = served_portal.root / "portal-data"
    proc = subprocess.run([*FZ, "--json", "portal", "add-account", "--data-dir", str(data_dir), "--account", "other",
                           "--admin-email", "boss@other.test"], env=served_portal.env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return Api(served_portal.url + "/api/v1", json.loads(proc.stdout)["token"])


def test_account_and_health(api: Api, served_portal: ServedPortal) -> None:
    assert api.ok("GET", "/account")["data"]["slug"] == "acme"
    with urllib.request.urlopen(served_portal.url + "/healthz", timeout=5) as r:
        assert json.load(r)["status"] == "ok"
    with urllib.request.urlopen(served_portal.url + "/metrics", timeout=5) as r:
        assert b"fz_portal_http_requests" in r.read()


@pytest.mark.parametrize("token,detail", [
    (None, "missing token"),
    ("garbage", "invalid token"),
    (".00000000-0000-0000-0000-000000000000.abcdef", "invalid token"),
])
def test_bad_tokens_are_401(api: Api, token: str | None, detail: str) -> None:
    code, body, headers = api.call("GET", "/users", token=token)
    assert code == 401
    assert body["detail"] == detail
    assert headers["Content-Type"].startswith("application/problem+json")


def test_tampered_secret_is_401(api: Api) -> None:
    assert api.token is not None
    tampered = api.token[:-1] + ("a" if api.token[-1] != "a" else "b")
    assert api.call("GET", "/users", token=tampered)[0] == 401


def test_revoked_and_expired_tokens_are_401(api: Api) -> None:
    made = api.ok("POST", "/tokens", {"type": "api", "name": "short"}, status=201)
    short = Api(api.url, made["secret"])
    assert short.call("GET", "/account")[0] == 200
    api.ok("DELETE", f"/tokens/{made['data']['id']}", status=204)
    code, body, _ = short.call("GET", "/account")
    assert (code, body["detail"]) == (401, "token revoked")

    made = api.ok("POST", "/tokens", {"type": "api", "expires_in": 1}, status=201)
    time.sleep(1.2)
    code, body, _ = Api(api.url, made["secret"]).call("GET", "/account")
    assert (code, body["detail"]) == (401, "token expired")


def test_wrong_kind_of_token_is_401(api: Api) -> None:
    api.ok("POST", "/sites", {"name": "gw-site"}, status=201)
    gw = api.ok("POST", "/tokens", {"type": "gateway", "site": "gw-site"}, status=201)
    code, body, _ = api.call("GET", "/users", token=gw["secret"])
    assert code == 401 and "gateway token cannot be used here" in body["detail"]


def test_crud_users_groups_memberships(api: Api) -> None:
    u = api.ok("POST", "/users", {"email": "Alice@Example.com", "name": "Alice"}, status=201)["data"]
    assert u["email"] == "alice@example.com" and u["groups"] == ["Everyone"]
    assert api.ok("GET", "/users/alice@example.com")["data"]["id"] == u["id"]
    code, body, _ = api.call("POST", "/users", {"email": "alice@example.com"})
    assert code == 409 and body["errors"][0]["field"] == "email"
    g = api.ok("POST", "/groups", {"name": "Engineering"}, status=201)["data"]
    api.ok("POST", "/groups/Engineering/members", {"user": "alice@example.com"}, status=201)
    assert api.call("POST", "/groups/Engineering/members", {"user": "alice@example.com"})[0] == 409
    members = api.ok("GET", f"/groups/{g['id']}/members")["data"]
    assert [m["email"] for m in members] == ["alice@example.com"]
    assert any(m["group"]["name"] == "Engineering" for m in api.ok("GET", "/memberships?user=alice@example.com")["data"])
    api.ok("DELETE", "/groups/Engineering/members/alice@example.com", status=204)
    assert api.call("DELETE", "/groups/Engineering/members/alice@example.com")[0] == 404
    assert api.call("DELETE", "/groups/Everyone")[0] == 409
    assert api.call("PATCH", "/groups/Everyone", {"name": "All"})[0] == 409
    assert api.ok("PATCH", "/users/alice@example.com", {"disabled": True})["data"]["disabled"] is True
    api.ok("PATCH", "/groups/Engineering", {"name": "Eng"})
    api.ok("DELETE", "/groups/Eng", status=204)
    api.ok("DELETE", "/users/alice@example.com", status=204)
    assert api.call("GET", "/users/alice@example.com")[0] == 404


def test_resources_validation_names_the_field(api: Api) -> None:
    api.ok("POST", "/sites", {"name": "HQ"}, status=201)
    cases = [
        ({"name": "lo", "site": "HQ", "address": "127.0.0.1"}, "address"),
        ({"name": "cgnat", "site": "HQ", "address": "100.64.1.0/24"}, "address"),
        ({"name": "all", "site": "HQ", "address": "0.0.0.0/0"}, "address"),
        ({"name": "dns", "site": "HQ", "address": "*.*"}, "address"),
        ({"name": "f", "site": "HQ", "address": "10.0.0.1", "filters": [{"protocol": "tcp", "ports": ["70000"]}]}, "filters"),
        ({"name": "f2", "site": "HQ", "address": "10.0.0.1", "filters": [{"protocol": "gre"}]}, "filters"),
        ({"name": "", "site": "HQ", "address": "10.0.0.1"}, "name"),
        ({"name": "nosite", "site": "nowhere", "address": "10.0.0.1"}, None),
    ]
    for body, field in cases:
        code, problem, _ = api.call("POST", "/resources", body)
        if field is None:
            assert code == 404, problem
            continue
        assert code == 422, (body, problem)
        assert problem["errors"][0]["field"].startswith(field), problem
    r = api.ok("POST", "/resources", {"name": "gitlab", "site": "HQ", "address": "GitLab.Corp.Example",
                                      "filters": [{"protocol": "tcp", "ports": ["443", "80"]}]}, status=201)["data"]
    assert r["type"] == "dns" and r["address"] == "gitlab.corp.example"
    assert api.call("POST", "/resources", {"name": "gitlab", "site": "HQ", "address": "10.1.1.1"})[0] == 409
    upd = api.ok("PATCH", "/resources/gitlab", {"address": "10.1.0.0/16"})["data"]
    assert (upd["type"], upd["address"]) == ("cidr", "10.1.0.0/16")
    assert api.call("DELETE", "/sites/HQ")[0] == 409


def test_policies_and_explain(api: Api) -> None:
    api.ok("POST", "/sites", {"name": "Lab"}, status=201)
    api.ok("POST", "/resources", {"name": "wiki", "site": "Lab", "address": "10.9.0.1"}, status=201)
    api.ok("POST", "/users", {"email": "bob@example.com"}, status=201)
    api.ok("POST", "/groups", {"name": "Wiki readers"}, status=201)
    explain = api.ok("POST", "/policies/explain", {"user": "bob@example.com", "resource": "wiki"})["data"]
    assert explain["allowed"] is False and explain["candidates"] == []
    api.ok("POST", "/groups/Wiki readers/members", {"user": "bob@example.com"}, status=201)
    p = api.ok("POST", "/policies", {"group": "Wiki readers", "resource": "wiki", "conditions": [
        {"property": "remote_ip", "operator": "is_in_cidr", "values": ["192.0.2.0/24"]}]}, status=201)["data"]
    deny = api.ok("POST", "/policies/explain", {"user": "bob@example.com", "resource": "wiki",
                                                "remote_ip": "198.51.100.7"})["data"]
    assert deny["allowed"] is False and deny["violated_properties"] == ["remote_ip"]
    assert deny["candidates"][0]["violated_properties"] == ["remote_ip"]
    allow = api.ok("POST", "/policies/explain", {"user": "bob@example.com", "resource": "wiki",
                                                 "remote_ip": "192.0.2.9"})["data"]
    assert allow["allowed"] is True and allow["policy_id"] == p["id"]
    code, problem, _ = api.call("POST", "/policies", {"group": "Wiki readers", "resource": "wiki", "conditions": [
        {"property": "remote_ip", "operator": "is_in_cidr", "values": ["not-a-cidr"]}]})
    assert code == 422 and problem["errors"][0]["field"].startswith("conditions[0]")
    assert api.call("POST", "/policies/explain", {"user": "bob@example.com", "resource": "wiki", "at": "yesterday"})[0] == 422
    api.ok("PATCH", f"/policies/{p['id']}", {"disabled": True})
    assert api.ok("POST", "/policies/explain", {"user": "bob@example.com", "resource": "wiki",
                                                "remote_ip": "192.0.2.9"})["data"]["allowed"] is False
    api.ok("DELETE", f"/policies/{p['id']}", status=204)
    assert api.call("GET", f"/policies/{p['id']}")[0] == 404


def test_account_isolation(api: Api, other_account: Api) -> None:
    api.ok("POST", "/sites", {"name": "Secret site"}, status=201)
    site = api.ok("GET", "/sites/Secret site")["data"]
    user = api.ok("POST", "/users", {"email": "carol@example.com"}, status=201)["data"]
    # The other account sees nothing of ours and can change nothing, by id or by name.
    assert other_account.call("GET", f"/sites/{site['id']}")[0] == 404
    assert other_account.call("GET", "/sites/Secret site")[0] == 404
    assert other_account.call("PATCH", f"/users/{user['id']}", {"disabled": True})[0] == 404
    assert other_account.call("DELETE", f"/sites/{site['id']}")[0] == 404
    assert other_account.call("POST", "/resources", {"name": "x", "site": site["id"], "address": "10.0.0.1"})[0] == 404
    assert all(u["email"] != "carol@example.com" for u in other_account.ok("GET", "/users")["data"])
    assert api.ok("GET", f"/users/{user['id']}")["data"]["disabled"] is False


def test_malformed_bodies(api: Api) -> None:
    code, problem, _ = api.call("POST", "/groups", raw=b"{not json")
    assert code == 400 and "not valid JSON" in problem["detail"]
    assert api.call("POST", "/groups", raw=b"[1, 2]")[0] == 400
    code, problem, _ = api.call("POST", "/groups", {"name": 42})
    assert code == 422 and problem["errors"][0]["field"] == "name"
    code, problem, _ = api.call("POST", "/groups", {"name": "x", "admin": True})
    assert code == 422 and problem["errors"][0]["field"] == "admin"
    code, problem, _ = api.call("POST", "/groups", raw=b'{"name": "' + b"a" * (2 * 1024 * 1024) + b'"}')
    assert code == 413
    assert api.call("GET", "/users?limit=0")[0] == 422
    assert api.call("GET", "/users?cursor=!!!")[0] == 422
    assert api.call("GET", "/nope")[0] == 404


def test_hostile_names_are_stored_verbatim(api: Api) -> None:
    for name in ["Robert'); DROP TABLE groups;--", 'quote " and \\ backslash', "ünïcödé ☃", "1 OR 1=1"]:
        g = api.ok("POST", "/groups", {"name": name}, status=201)["data"]
        assert g["name"] == name
        assert api.ok("GET", f"/groups/{g['id']}")["data"]["name"] == name
    assert api.ok("GET", "/groups?limit=500")["data"]


def test_pagination_walks_every_row(api: Api) -> None:
    for i in range(7):
        api.ok("POST", "/sites", {"name": f"page-site-{i}"}, status=201)
    seen: list[str] = []
    cursor = None
    while True:
        q = "/sites?limit=3" + (f"&cursor={cursor}" if cursor else "")
        body = api.ok("GET", q)
        seen += [s["name"] for s in body["data"]]
        cursor = body["next_cursor"]
        if not cursor:
            break
    assert len(seen) == len(set(seen))
    assert {f"page-site-{i}" for i in range(7)} <= set(seen)


def test_tokens_never_show_secrets(api: Api) -> None:
    api.ok("POST", "/users", {"email": "svc@example.com", "type": "service_account", "name": "ci"}, status=201)
    made = api.ok("POST", "/tokens", {"type": "client", "user": "svc@example.com", "expires_in": 3600}, status=201)
    assert made["secret"].startswith(".")
    listed = api.ok("GET", "/tokens?type=client")["data"]
    assert any(t["id"] == made["data"]["id"] for t in listed)
    assert made["secret"] not in json.dumps(listed)
    code, problem, _ = api.call("POST", "/tokens", {"type": "gateway"})
    assert code == 422 and problem["errors"][0]["field"] == "site"
    assert api.call("POST", "/tokens", {"type": "client", "user": "svc@example.com", "expires_in": -5})[0] == 422
    relay = api.ok("POST", "/tokens", {"type": "relay"}, status=201)
    assert relay["data"]["type"] == "relay"


def test_openapi_describes_every_route(served_portal: ServedPortal) -> None:
    from firezone.portal.web import api as api_mod

    with urllib.request.urlopen(served_portal.url + "/api/openapi.json", timeout=5) as r:
        doc = json.load(r)
    assert doc["openapi"].startswith("3.")
    described = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    for route in api_mod.ROUTES:
        assert (route.method, "/api/v1" + route.path) in described
    for ops in doc["paths"].values():
        for op in ops.values():
            assert op["summary"] and op["responses"]


def test_account_client_settings(api: Api, other_account: Api) -> None:
    a = api.ok("GET", "/account")["data"]
    assert a["search_domain"] is None and a["upstream_dns"] == []
    a = api.ok("PATCH", "/account", {"search_domain": "Corp.Example.", "upstream_dns": ["192.0.2.53:5353"]})["data"]
    assert a["search_domain"] == "corp.example" and a["upstream_dns"] == ["192.0.2.53:5353"]
    # A partial update keeps the other setting; another account is untouched.
    a = api.ok("PATCH", "/account", {"upstream_dns": ["2001:db8::53"]})["data"]
    assert a["search_domain"] == "corp.example" and a["upstream_dns"] == ["2001:db8::53"]
    assert other_account.ok("GET", "/account")["data"]["search_domain"] is None
    for body, field in [({"search_domain": "no_such thing"}, "search_domain"),
                        ({"upstream_dns": ["dns.example"]}, "upstream_dns[0]"),
                        ({"upstream_dns": "192.0.2.53"}, "upstream_dns"),
                        ({"slug": "evil"}, "slug")]:
        code, err, _ = api.call("PATCH", "/account", body)
        assert code == 422 and field in err["detail"], (body, err)
    assert api.ok("GET", "/account")["data"]["upstream_dns"] == ["2001:db8::53"]
    a = api.ok("PATCH", "/account", {"search_domain": None, "upstream_dns": []})["data"]
    assert a["search_domain"] is None and a["upstream_dns"] == []
