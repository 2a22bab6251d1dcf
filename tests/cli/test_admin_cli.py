"""The admin verbs as a user runs them: ``fz`` subprocesses against a served portal."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from typing import Any

import pytest

from tests.cli.conftest import ADMIN_EMAIL, FZ, ServedPortal, free_port, isolated_env

pytestmark = pytest.mark.timeout(120)


def uid() -> str:
    return uuid.uuid4().hex[:8]


def one_line_error(r: Any, *needles: str) -> str:
    """The error is exactly one line on stderr, starting with 'fz: error:' and naming each needle."""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, str(r)
    assert lines[0].startswith("fz: error: "), str(r)
    for n in needles:
        assert n in lines[0], f"{n!r} missing in: {lines[0]}"
    return lines[0]


# --- finding the portal and the token --------------------------------------------------------------

def test_no_token(served_portal: ServedPortal, tmp_path: Any) -> None:
    env = isolated_env(tmp_path)
    r = served_portal.fz("--portal", served_portal.url, "user", "list", env=env, expect=1)
    one_line_error(r, "not signed in to the portal", "fz portal init", "FIREZONE_TOKEN")


def test_no_portal_configured(served_portal: ServedPortal, tmp_path: Any) -> None:
    env = isolated_env(tmp_path)
    r = served_portal.fz("user", "list", env=env, expect=1)
    one_line_error(r, "no portal configured", "--portal")


def test_rejected_token(served_portal: ServedPortal) -> None:
    env = {**served_portal.env, "FIREZONE_TOKEN": "not-a-real-token"}
    r = served_portal.fz("user", "list", env=env, expect=1)
    one_line_error(r, "token rejected", "fz portal init")


def test_wrong_portal_url(served_portal: ServedPortal) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    r = served_portal.fz("--portal", url, "user", "list", expect=1)
    assert one_line_error(r) == f"fz: error: cannot reach the portal at {url}: connection refused"


def test_portal_url_without_scheme(served_portal: ServedPortal) -> None:
    bare = served_portal.url.removeprefix("http://")
    one_line_error(served_portal.fz("--portal", bare, "user", "list", expect=1),
                   "invalid portal URL", "http://")


def test_not_a_portal(served_portal: ServedPortal) -> None:
    r = served_portal.fz("--portal", served_portal.url + "/elsewhere", "user", "list", expect=1)
    one_line_error(r, "404", "is this an fz portal?")


def test_portal_from_env_and_token_from_env(served_portal: ServedPortal, tmp_path: Any) -> None:
    env = {**isolated_env(tmp_path), "FIREZONE_PORTAL_URL": served_portal.url, "FIREZONE_TOKEN": served_portal.admin_token()}
    users = served_portal.fz_json("user", "list", env=env)
    assert ADMIN_EMAIL in [u["email"] for u in users]


def _config_file(root: Any, text: str) -> None:
    (root / "config" / "firezone").mkdir(parents=True, exist_ok=True)
    (root / "config" / "firezone" / "config.toml").write_text(text)


def test_portal_from_config_file(served_portal: ServedPortal, tmp_path: Any) -> None:
    env = {**isolated_env(tmp_path), "FIREZONE_TOKEN": served_portal.admin_token()}
    _config_file(tmp_path, f'portal_url = "{served_portal.url}"\n')
    r = served_portal.fz("user", "show", ADMIN_EMAIL, "--json", env=env)
    assert r.json()["email"] == ADMIN_EMAIL


def test_portal_precedence(served_portal: ServedPortal, tmp_path: Any) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    env = {**isolated_env(tmp_path), "FIREZONE_TOKEN": served_portal.admin_token()}
    _config_file(tmp_path, f'portal_url = "{dead}"\n')
    one_line_error(served_portal.fz("user", "list", env=env, expect=1), dead)
    served_portal.fz("--portal", served_portal.url, "user", "list", env=env)        # flag beats file
    served_portal.fz("user", "list", env={**env, "FIREZONE_PORTAL_URL": served_portal.url})  # env beats file
    one_line_error(served_portal.fz("--portal", dead, "user", "list",               # flag beats env
                                    env={**env, "FIREZONE_PORTAL_URL": served_portal.url}, expect=1), dead)


def test_stored_sign_in_is_used_when_nothing_else_is_given(served_portal: ServedPortal) -> None:
    assert ADMIN_EMAIL in [u["email"] for u in served_portal.fz_json("user", "list")]


# --- users -----------------------------------------------------------------------------------------

def test_user_lifecycle(served_portal: ServedPortal) -> None:
    p = served_portal
    email = f"alice-{uid()}@example.com"
    u = p.fz_json("user", "add", email, "--name", "Alice Example")
    assert (u["email"], u["name"], u["type"], u["disabled"]) == (email, "Alice Example", "user", False)

    human = p.fz("user", "add", f"admin-{uid()}@example.com", "--admin")
    assert "created admin" in human.stdout
    svc = p.fz_json("user", "add", f"ci-{uid()}@example.com", "--service-account")
    assert svc["type"] == "service_account"

    listed = p.fz_json("user", "list")
    assert {email, svc["email"], ADMIN_EMAIL} <= {x["email"] for x in listed}
    table = p.fz("user", "list").stdout
    assert email in table and "Alice Example" in table

    shown = p.fz("user", "show", email, "--json").json()
    assert shown["id"] == u["id"]
    assert p.fz_json("user", "show", u["id"])["email"] == email
    assert email in p.fz("user", "show", email).stdout

    assert p.fz_json("user", "disable", email)["disabled"] is True
    assert p.fz_json("user", "show", email)["disabled"] is True
    assert "enabled" in p.fz("user", "enable", email).stdout
    assert p.fz_json("user", "show", email)["disabled"] is False

    assert "removed" in p.fz("user", "remove", email).stdout
    r = p.fz("user", "show", email, expect=1)
    one_line_error(r)


def test_user_duplicate_email(served_portal: ServedPortal) -> None:
    email = f"dup-{uid()}@example.com"
    served_portal.fz("user", "add", email)
    r = served_portal.fz("user", "add", email, expect=1)
    one_line_error(r)


def test_user_invalid_email_names_the_field(served_portal: ServedPortal) -> None:
    r = served_portal.fz("user", "add", "not-an-email", expect=1)
    one_line_error(r, "email")


def test_user_admin_and_service_account_is_a_usage_error(served_portal: ServedPortal) -> None:
    r = served_portal.fz("user", "add", "x@example.com", "--admin", "--service-account", expect=2)
    assert "exclude each other" in r.stderr


def test_user_unknown(served_portal: ServedPortal) -> None:
    for verb in ("show", "disable", "enable", "remove"):
        one_line_error(served_portal.fz("user", verb, f"nobody-{uid()}@example.com", expect=1))


def test_user_list_limit(served_portal: ServedPortal) -> None:
    for _ in range(3):
        served_portal.fz("user", "add", f"lim-{uid()}@example.com")
    assert len(served_portal.fz_json("user", "list", "--limit", "2")) == 2
    assert len(served_portal.fz_json("user", "list")) >= 4
    served_portal.fz("user", "list", "--limit", "0", expect=2)


# --- groups ----------------------------------------------------------------------------------------

def test_group_lifecycle(served_portal: ServedPortal) -> None:
    p = served_portal
    name = f"eng-{uid()}"
    email = f"bob-{uid()}@example.com"
    p.fz("user", "add", email)
    g = p.fz_json("group", "add", name)
    assert g["name"] == name and g["managed"] is False

    assert name in [x["name"] for x in p.fz_json("group", "list")]
    assert name in p.fz("group", "list").stdout

    p.fz("group", "add-member", name, email)
    assert [m["email"] for m in p.fz_json("group", "members", name)] == [email]
    assert email in p.fz("group", "members", name).stdout
    assert name in p.fz_json("user", "show", email)["groups"]
    assert p.fz_json("group", "show", name)["member_count"] == 1

    p.fz("group", "remove-member", name, email)
    assert p.fz_json("group", "members", name) == []

    renamed = f"{name}-new"
    assert p.fz_json("group", "rename", name, renamed)["name"] == renamed
    one_line_error(p.fz("group", "show", name, expect=1))

    p.fz("group", "remove", renamed)
    assert renamed not in [x["name"] for x in p.fz_json("group", "list")]


def test_group_errors(served_portal: ServedPortal) -> None:
    p = served_portal
    name = f"ops-{uid()}"
    email = f"carol-{uid()}@example.com"
    p.fz("user", "add", email)
    p.fz("group", "add", name)
    one_line_error(p.fz("group", "add", name, expect=1))                          # duplicate
    missing = f"nope-{uid()}"
    one_line_error(p.fz("group", "add-member", missing, email, expect=1))        # unknown group
    one_line_error(p.fz("group", "add-member", name, f"x-{uid()}@example.com", expect=1))
    one_line_error(p.fz("group", "members", missing, expect=1))
    one_line_error(p.fz("group", "remove", missing, expect=1))
    one_line_error(p.fz("group", "remove", "Everyone", expect=1))                 # managed group


# --- sites -----------------------------------------------------------------------------------------

def test_site_lifecycle(served_portal: ServedPortal) -> None:
    p = served_portal
    name = f"hq-{uid()}"
    s = p.fz_json("site", "add", name)
    assert s["name"] == name and s["resource_count"] == 0
    assert name in [x["name"] for x in p.fz_json("site", "list")]
    assert name in p.fz("site", "list").stdout
    one_line_error(p.fz("site", "add", name, expect=1))                          # duplicate

    renamed = f"{name}-new"
    assert "renamed" in p.fz("site", "rename", name, renamed).stdout
    name = renamed
    res = f"db-{uid()}"
    p.fz("resource", "add", res, "--site", name, "--address", "10.1.2.3")
    one_line_error(p.fz("site", "remove", name, expect=1))                        # still has resources
    p.fz("resource", "remove", res)
    p.fz("site", "remove", name)
    assert name not in [x["name"] for x in p.fz_json("site", "list")]
    one_line_error(p.fz("site", "remove", name, expect=1))


# --- resources -------------------------------------------------------------------------------------

@pytest.fixture
def site_name(served_portal: ServedPortal) -> str:
    name = f"site-{uid()}"
    served_portal.fz("site", "add", name)
    return name


@pytest.mark.parametrize(("address", "rtype"), [
    ("10.0.0.5", "ip"), ("10.0.0.0/24", "cidr"), ("2001:db8::/64", "cidr"),
    ("*.corp.example.com", "dns"), ("db.example.com", "dns"),
])
def test_resource_type_inferred(served_portal: ServedPortal, site_name: str, address: str, rtype: str) -> None:
    r = served_portal.fz_json("resource", "add", f"r-{uid()}", "--site", site_name, "--address", address)
    assert r["type"] == rtype
    assert r["site"]["name"] == site_name


def test_resource_lifecycle(served_portal: ServedPortal, site_name: str) -> None:
    p = served_portal
    name = f"web-{uid()}"
    r = p.fz_json("resource", "add", name, "--site", site_name, "--address", "198.51.100.10",
                  "--type", "ip", "--description", "http://intranet/", "--filter", "tcp/80",
                  "--filter", "udp/1000-2000", "--filter", "icmp", "--filter", "tcp/8000-8100")
    assert r["address"] == "198.51.100.10" and r["address_description"] == "http://intranet/"
    assert sorted((f["protocol"], sorted(f["ports"])) for f in r["filters"]) == [
        ("icmp", []), ("tcp", ["80", "8000-8100"]), ("udp", ["1000-2000"])]

    assert name in [x["name"] for x in p.fz_json("resource", "list")]
    assert [x["name"] for x in p.fz_json("resource", "list", "--site", site_name)] == [name]
    table = p.fz("resource", "list", "--site", site_name).stdout
    assert name in table and "tcp/80,8000-8100" in table
    shown = p.fz("resource", "show", name).stdout
    assert "198.51.100.10" in shown and site_name in shown

    up = p.fz_json("resource", "update", name, "--address", "198.51.100.0/28", "--type", "cidr",
                   "--filter", "tcp/443")
    assert (up["address"], up["type"]) == ("198.51.100.0/28", "cidr")
    assert up["filters"] == [{"protocol": "tcp", "ports": ["443"]}]
    assert p.fz_json("resource", "update", name, "--no-filters")["filters"] == []
    new_name = f"web2-{uid()}"
    assert p.fz_json("resource", "update", name, "--name", new_name)["name"] == new_name
    p.fz("resource", "update", new_name, expect=2)                               # nothing to update

    assert "removed" in p.fz("resource", "remove", new_name).stdout
    one_line_error(p.fz("resource", "show", new_name, expect=1))


def test_resource_errors(served_portal: ServedPortal, site_name: str) -> None:
    p = served_portal
    one_line_error(p.fz("resource", "add", f"bad-{uid()}", "--site", site_name,
                        "--address", "not an address!", expect=1), "address")
    one_line_error(p.fz("resource", "add", f"bad-{uid()}", "--site", site_name,
                        "--address", "100.64.0.1", expect=1), "address")            # reserved range
    one_line_error(p.fz("resource", "add", f"x-{uid()}", "--site", f"nosite-{uid()}",
                        "--address", "10.0.0.1", expect=1))
    name = f"dup-{uid()}"
    p.fz("resource", "add", name, "--site", site_name, "--address", "10.9.9.9")
    one_line_error(p.fz("resource", "add", name, "--site", site_name, "--address", "10.9.9.8", expect=1))
    for bad in ("tcp/99999", "sctp/80", "icmp/8", "tcp/http"):
        r = p.fz("resource", "add", f"f-{uid()}", "--site", site_name, "--address", "10.0.0.1",
                 "--filter", bad, expect=2)
        assert "--filter" in r.stderr
    r = p.fz("resource", "add", "x", "--address", "10.0.0.1", expect=2)
    assert "--site" in r.stderr
    one_line_error(p.fz("resource", "update", f"none-{uid()}", "--name", "y", expect=1))


# --- policies --------------------------------------------------------------------------------------

@pytest.fixture
def grant(served_portal: ServedPortal, site_name: str) -> dict[str, str]:
    p = served_portal
    t = uid()
    names = {"group": f"g-{t}", "resource": f"res-{t}", "user": f"dave-{t}@example.com",
             "outsider": f"eve-{t}@example.com"}
    p.fz("group", "add", names["group"])
    p.fz("user", "add", names["user"])
    p.fz("user", "add", names["outsider"])
    p.fz("group", "add-member", names["group"], names["user"])
    p.fz("resource", "add", names["resource"], "--site", site_name, "--address", "10.20.30.40")
    return names


def test_policy_lifecycle(served_portal: ServedPortal, grant: dict[str, str]) -> None:
    p = served_portal
    pol = p.fz_json("policy", "add", "--group", grant["group"], "--resource", grant["resource"],
                    "--description", "engineers reach the db",
                    "--condition", "remote_ip is_in_cidr 192.0.2.0/24")
    assert pol["group"]["name"] == grant["group"] and pol["resource"]["name"] == grant["resource"]
    assert pol["description"] == "engineers reach the db"
    assert pol["conditions"][0]["property"] == "remote_ip"
    assert pol["conditions"][0]["operator"] == "is_in_cidr"
    assert pol["conditions"][0]["values"] == ["192.0.2.0/24"]

    assert pol["id"] in [x["id"] for x in p.fz_json("policy", "list")]
    assert [x["id"] for x in p.fz_json("policy", "list", "--group", grant["group"])] == [pol["id"]]
    assert [x["id"] for x in p.fz_json("policy", "list", "--resource", grant["resource"])] == [pol["id"]]
    table = p.fz("policy", "list", "--group", grant["group"]).stdout
    assert pol["id"] in table and "remote_ip in 192.0.2.0/24" in table
    assert p.fz_json("policy", "show", pol["id"])["id"] == pol["id"]
    up = p.fz_json("policy", "update", pol["id"], "--description", "changed",
                   "--condition", "time in M-F/09:00-17:00/Europe/Berlin")
    assert up["description"] == "changed"
    assert [c["property"] for c in up["conditions"]] == ["current_utc_datetime"]
    assert "time in MTWRF/09:00-17:00/Europe/Berlin" in p.fz("policy", "show", pol["id"]).stdout
    assert p.fz_json("policy", "update", pol["id"], "--no-conditions")["conditions"] == []
    p.fz("policy", "update", pol["id"], expect=2)                                 # nothing to update
    p.fz("policy", "update", pol["id"], "--condition", "bogus", expect=2)
    assert p.fz_json("policy", "disable", pol["id"])["disabled"] is True
    assert p.fz_json("policy", "show", pol["id"])["disabled"] is True
    assert "enabled" in p.fz("policy", "enable", pol["id"]).stdout
    assert p.fz_json("policy", "show", pol["id"])["disabled"] is False

    p.fz("policy", "remove", pol["id"])
    assert p.fz_json("policy", "list", "--group", grant["group"]) == []
    one_line_error(p.fz("policy", "remove", pol["id"], expect=1))


def test_policy_errors(served_portal: ServedPortal, grant: dict[str, str]) -> None:
    p = served_portal
    one_line_error(p.fz("policy", "add", "--group", f"nogroup-{uid()}", "--resource", grant["resource"],
                        expect=1))
    one_line_error(p.fz("policy", "add", "--group", grant["group"], "--resource", f"nores-{uid()}",
                        expect=1))
    r = p.fz("policy", "add", "--group", grant["group"], "--resource", grant["resource"],
             "--condition", "remote_ip frobnicates 10.0.0.0/8", expect=2)
    assert "--condition" in r.stderr and "Traceback" not in r.stderr
    r = p.fz("policy", "add", "--group", grant["group"], "--resource", grant["resource"],
             "--condition", "", expect=2)
    assert "--condition" in r.stderr


def test_policy_explain_allow_and_deny(served_portal: ServedPortal, grant: dict[str, str]) -> None:
    p = served_portal
    base = ["policy", "explain", "--user", grant["user"], "--resource", grant["resource"]]

    # No policy at all: deny.
    r = p.fz(*base, expect=3)
    assert "deny" in r.stdout
    assert p.fz("--json", *base, expect=3).json()["allowed"] is False

    pol = p.fz_json("policy", "add", "--group", grant["group"], "--resource", grant["resource"],
                    "--condition", "remote_ip is_in_cidr 192.0.2.0/24")

    r = p.fz(*base, "--from-ip", "192.0.2.7", expect=0)
    assert "allow" in r.stdout and pol["id"] in r.stdout
    d = p.fz("--json", *base, "--from-ip", "192.0.2.7", expect=0).json()
    assert d["allowed"] is True and d["policy_id"] == pol["id"]

    r = p.fz(*base, "--from-ip", "198.51.100.7", "--at", "2026-11-25T10:00:00Z", expect=3)
    assert "deny" in r.stdout and pol["id"] in r.stdout
    assert "failed: remote_ip in 192.0.2.0/24" in r.stdout
    d = p.fz("--json", *base, "--from-ip", "198.51.100.7", expect=3).json()
    assert d["allowed"] is False
    assert [c["policy_id"] for c in d["candidates"]] == [pol["id"]]
    assert "remote_ip" in d["candidates"][0]["violated_properties"]

    # A disabled policy is a candidate that never matches.
    p.fz("policy", "disable", pol["id"])
    r = p.fz(*base, "--from-ip", "192.0.2.7", expect=3)
    assert "disabled" in r.stdout
    p.fz("policy", "enable", pol["id"])

    # Not a member of the group: deny.
    p.fz("policy", "explain", "--user", grant["outsider"], "--resource", grant["resource"],
         "--from-ip", "192.0.2.7", expect=3)

    # Usage errors and unknown objects.
    p.fz(*base, "--at", "yesterday", expect=2)
    p.fz(*base, "--from-ip", "999.1.1.1", expect=2)
    one_line_error(p.fz("policy", "explain", "--user", f"ghost-{uid()}@example.com",
                        "--resource", grant["resource"], expect=1))


# --- tokens ----------------------------------------------------------------------------------------

def test_token_create_list_revoke(served_portal: ServedPortal, site_name: str) -> None:
    p = served_portal
    gw = p.fz_json("token", "create", "gateway", "--site", site_name, "--expires", "7d")
    assert gw["type"] == "gateway" and gw["site"]["name"] == site_name and gw["secret"]
    assert gw["expires_at"]

    relay = p.fz_json("token", "create", "relay", "--name", "relay-1")
    assert relay["type"] == "relay" and relay["secret"]

    svc = f"svc-{uid()}@example.com"
    p.fz("user", "add", svc, "--service-account")
    client = p.fz_json("token", "create", "client", "--user", svc, "--expires", "12h")
    assert client["type"] == "client" and client["actor"]["email"] == svc and client["expires_at"]

    # Human output: the secret alone on stdout, the explanation on stderr.
    human = p.fz("token", "create", "relay")
    assert len(human.stdout.strip().splitlines()) == 1 and human.stdout.strip()
    assert "shown only now" in human.stderr

    listed = {t["id"]: t for t in p.fz_json("token", "list")}
    assert {gw["id"], relay["id"], client["id"]} <= set(listed)
    assert all("secret" not in t for t in listed.values())
    assert [t["type"] for t in p.fz_json("token", "list", "--type", "gateway")] == \
        ["gateway"] * len(p.fz_json("token", "list", "--type", "gateway"))
    assert relay["id"] in p.fz("token", "list").stdout

    p.fz("token", "revoke", relay["id"])
    assert p.fz_json("token", "show", relay["id"])["revoked_at"]
    one_line_error(p.fz("token", "revoke", str(uuid.uuid4()), expect=1))


def test_api_token_works_and_revocation_rejects_it(served_portal: ServedPortal, tmp_path: Any) -> None:
    p = served_portal
    api = p.fz_json("token", "create", "api", "--expires", "1h")
    env = {**isolated_env(tmp_path), "FIREZONE_PORTAL_URL": p.url, "FIREZONE_TOKEN": api["secret"]}
    assert ADMIN_EMAIL in [u["email"] for u in p.fz_json("user", "list", env=env)]
    p.fz("token", "revoke", api["id"])
    one_line_error(p.fz("user", "list", env=env, expect=1), "token rejected")


def test_token_usage_errors(served_portal: ServedPortal, site_name: str) -> None:
    p = served_portal
    for bad in ("5x", "0", "-1h", "1.5h", "forever"):
        r = p.fz("token", "create", "gateway", "--site", site_name, "--expires", bad, expect=2)
        assert "invalid duration" in r.stderr, str(r)
    assert "--site" in p.fz("token", "create", "gateway", expect=2).stderr
    assert "--user" in p.fz("token", "create", "client", "--expires", "1d", expect=2).stderr
    assert "--expires" in p.fz("token", "create", "client", "--user", ADMIN_EMAIL, expect=2).stderr
    p.fz("token", "create", "relay", "--site", site_name, expect=2)
    p.fz("token", "create", "bogus", expect=2)
    one_line_error(p.fz("token", "create", "gateway", "--site", f"nosite-{uid()}", expect=1))
    one_line_error(p.fz("token", "create", "client", "--user", f"ghost-{uid()}@example.com",
                        "--expires", "1d", expect=1))


# --- audit -----------------------------------------------------------------------------------------

def _record_decisions(p: ServedPortal, rows: list[dict[str, Any]]) -> None:
    """Decisions are written when clients ask for access; write some the same way a client would cause."""
    from firezone.roles.portal import open_store

    store = open_store(p.extra["data_dir"])
    try:
        account = store.account_by_slug("acme")
        assert account is not None
        for r in rows:
            store.record_decision(account["id"], result=r["result"], reason=r["reason"],
                                  actor=store.actor(account["id"], r["user"]),
                                  resource=store.resource(account["id"], r["resource"]),
                                  violated=r.get("violated", ()), remote_ip=r.get("remote_ip"))
            time.sleep(0.005)  # distinct millisecond timestamps keep "newest first" well defined
    finally:
        store.db.close()


def test_audit_list(served_portal: ServedPortal, grant: dict[str, str]) -> None:
    p = served_portal
    _record_decisions(p, [
        {"result": "allow", "reason": "allowed", "user": grant["user"], "resource": grant["resource"],
         "remote_ip": "192.0.2.7"},
        {"result": "deny", "reason": "condition not met", "user": grant["user"],
         "resource": grant["resource"], "violated": ["remote_ip"], "remote_ip": "198.51.100.7"},
        {"result": "deny", "reason": "no policy", "user": grant["outsider"], "resource": grant["resource"]},
    ])
    mine = p.fz_json("audit", "list", "--resource", grant["resource"])
    assert [(d["result"], d["actor"]["email"]) for d in mine] == [
        ("deny", grant["outsider"]), ("deny", grant["user"]), ("allow", grant["user"])]   # newest first
    denied = p.fz_json("audit", "list", "--resource", grant["resource"], "--result", "deny")
    assert [d["result"] for d in denied] == ["deny", "deny"]
    by_user = p.fz_json("audit", "list", "--user", grant["user"], "--result", "deny")
    assert [d["violated_properties"] for d in by_user] == [["remote_ip"]]
    assert len(p.fz_json("audit", "list", "--resource", grant["resource"], "--limit", "1")) == 1
    table = p.fz("audit", "list", "--resource", grant["resource"]).stdout
    assert "198.51.100.7" in table and "condition not met" in table and grant["outsider"] in table
    p.fz("audit", "list", "--result", "maybe", expect=2)


# --- output contract -------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["user", "list"], ["group", "list"], ["site", "list"], ["resource", "list"], ["policy", "list"],
    ["token", "list"], ["audit", "list"],
])
def test_json_lists_parse(served_portal: ServedPortal, args: list[str]) -> None:
    before = served_portal.fz("--json", *args).json()
    after = served_portal.fz(*args, "--json").json()
    assert isinstance(before, list) and isinstance(after, list)
    json.dumps(before)


@pytest.mark.parametrize("args", [
    ["user"], ["user", "add"], ["group"], ["site"], ["resource", "add"], ["policy", "explain"],
    ["token", "create"], ["audit", "list"],
])
def test_help(args: list[str], tmp_path: Any) -> None:
    proc = subprocess.run([*FZ, *args, "--help"], env=isolated_env(tmp_path), capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: fz ")


def test_condition_syntax_is_in_policy_add_help(tmp_path: Any) -> None:
    proc = subprocess.run([*FZ, "policy", "add", "--help"], env=isolated_env(tmp_path),
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL, check=False)
    assert "remote_ip in 10.0.0.0/8" in proc.stdout and "client_verified" in proc.stdout


def test_list_follows_next_cursor_past_one_page(served_portal: ServedPortal) -> None:
    from firezone.portal.api_client import MAX_PAGE, ApiClient

    api = ApiClient(served_portal.url, served_portal.admin_token())
    tag = uid()
    have = len(served_portal.fz_json("user", "list"))
    for i in range(max(0, MAX_PAGE + 5 - have)):
        api.post("/users", json={"email": f"bulk{i}-{tag}@example.com"})
    users = served_portal.fz_json("user", "list")
    assert len(users) > MAX_PAGE
    assert len({u["id"] for u in users}) == len(users)
    assert len(served_portal.fz_json("user", "list", "--limit", str(MAX_PAGE + 1))) == MAX_PAGE + 1


def test_account_show_and_set(served_portal: ServedPortal) -> None:
    r = served_portal.fz("--json", "account", "set", "--search-domain", "corp.example", "--upstream-dns", "192.0.2.53")
    assert json.loads(r.stdout)["search_domain"] == "corp.example"
    shown = served_portal.fz("account", "show").stdout
    assert "corp.example" in shown and "192.0.2.53" in shown
    one_line_error(served_portal.fz("account", "set", "--search-domain", "bad domain", expect=1), "search_domain")
    one_line_error(served_portal.fz("account", "set", "--upstream-dns", "x.example", expect=1), "upstream_dns[0]")
    assert "nothing to change" in served_portal.fz("account", "set", expect=2).stderr
    assert "exclude" in served_portal.fz("account", "set", "--system-dns", "--upstream-dns", "192.0.2.1",
                                         expect=2).stderr
    r = served_portal.fz("--json", "account", "set", "--system-dns", "--search-domain", "")
    assert json.loads(r.stdout)["search_domain"] is None and json.loads(r.stdout)["upstream_dns"] == []
