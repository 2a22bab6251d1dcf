"""The portal's domain store: accounts, actors, groups, sites, resources, policies, tokens, devices.

Every query is scoped to one account: an id of another account is simply "not found". Validation of
resources and conditions lives in ``firezone.portal.domain``; this module owns names, references,
uniqueness and the audit log. Listeners registered with :meth:`Store.subscribe` hear every change
(the control plane pushes them to connected clients and gateways).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator, cast

from firezone.portal import tokens
from firezone.portal.db.api import Database, IntegrityError, Row
from firezone.portal.domain import account as account_settings
from firezone.portal.domain import policies as engine
from firezone.portal.domain import resources
from firezone.portal.errors import Conflict, Invalid, NotFound, Unauthorized
from firezone.runtime.rng import SYSTEM_RNG

log = logging.getLogger(__name__)

ACTOR_TYPES = ("user", "admin", "service_account")
TOKEN_TYPES = ("api", "client", "gateway", "relay")
EVERYONE = "Everyone"
TUNNEL_V4 = "100.64.0.0/11"
TUNNEL_V6 = "fd00:2021:1111::/107"
DEFAULT_CLIENT_SESSION_S = 7 * 24 * 3600
MAX_NAME = 255
_EMAIL = re.compile(r"^[^@\s\x00-\x1f]+@[^@\s\x00-\x1f]+$")
_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{1,62}$")
# First path segments the portal serves itself; an account slug may not shadow them.
RESERVED_SLUGS = frozenset({"api", "auth", "static", "client", "gateway", "relay", "healthz", "metrics",
                            "readyz", "admin", "sign_in", "oidc", "favicon.ico", "robots.txt"})


def now_ms() -> int:
    return int(time.time() * 1000)


def iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _new_id() -> str:
    return str(uuid.uuid4())


def _is_uuid(ref: str) -> bool:
    try:
        uuid.UUID(ref)
        return True
    except (ValueError, AttributeError, TypeError):
        return False


def encode_cursor(created_at: int, oid: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at}:{oid}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> tuple[int, str] | None:
    if not cursor:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, oid = raw.split(":", 1)
        return int(at), oid
    except (ValueError, UnicodeDecodeError):
        raise Invalid("cursor", "not a cursor this API returned") from None


@dataclass(frozen=True)
class Page:
    rows: list[Row]
    next_cursor: str | None


@dataclass(frozen=True)
class Change:
    """Something changed in an account: ``kind`` is the table, ``action`` created/updated/deleted."""

    account_id: str
    kind: str
    action: str
    id: str
    row: Row | None = None
    before: Row | None = None


@dataclass(frozen=True)
class TokenInfo:
    """A verified token: what it is and who it speaks for."""

    id: str
    type: str
    account_id: str | None
    actor_id: str | None
    site_id: str | None
    provider_id: str | None
    expires_at: int | None
    row: Row


def _require_name(field: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Invalid(field, "must be a non-empty string")
    value = value.strip()
    if len(value) > MAX_NAME:
        raise Invalid(field, f"must be at most {MAX_NAME} characters")
    if any(ord(c) < 0x20 for c in value):
        raise Invalid(field, "must not contain control characters")
    return value


def _email(value: Any) -> str:
    if not isinstance(value, str) or not _EMAIL.match(value.strip()) or len(value) > 320:
        raise Invalid("email", f"{value!r} is not an email address")
    return value.strip().lower()


class Store:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._listeners: list[Callable[[Change], None]] = []

    # -- change notifications -------------------------------------------------------------------

    def subscribe(self, fn: Callable[[Change], None]) -> None:
        self._listeners.append(fn)

    def _emit(self, change: Change) -> None:
        for fn in list(self._listeners):
            try:
                fn(change)
            except Exception:  # noqa: BLE001 - a listener must never break a write
                log.exception("change listener failed", extra={"kind": change.kind})

    def _unique(self, e: IntegrityError, field: str, value: str, kind: str) -> Conflict:
        return Conflict(f"a {kind} named {value!r} already exists", field=field)

    def _page(self, sql: str, params: dict[str, Any], limit: int, cursor: str | None,
              alias: str = "") -> Page:
        p = f"{alias}." if alias else ""
        c = decode_cursor(cursor)
        where = ""
        if c is not None:
            where = f" AND ({p}created_at > :c_at OR ({p}created_at = :c_at AND {p}id > :c_id))"
            params = {**params, "c_at": c[0], "c_id": c[1]}
        rows = self.db.fetchall(f"{sql}{where} ORDER BY {p}created_at, {p}id LIMIT :lim",
                                {**params, "lim": limit + 1})
        nxt = None
        if len(rows) > limit:
            rows = rows[:limit]
            nxt = encode_cursor(rows[-1]["created_at"], rows[-1]["id"])
        return Page(rows, nxt)

    # -- accounts -------------------------------------------------------------------------------

    def create_account(self, name: str, slug: str) -> Row:
        name = _require_name("name", name)
        if not isinstance(slug, str) or not _SLUG.match(slug):
            raise Invalid("slug", "must be 2-63 characters of a-z, 0-9, '-' or '_', starting with a letter or digit")
        if slug in RESERVED_SLUGS:
            raise Invalid("slug", f"{slug!r} is reserved by the portal; choose another")
        aid = _new_id()
        t = now_ms()
        with self.db.transaction():
            try:
                self.db.execute("INSERT INTO accounts (id, name, slug, created_at) VALUES (:id, :n, :s, :t)",
                                {"id": aid, "n": name, "s": slug, "t": t})
            except IntegrityError:
                raise Conflict(f"an account with slug {slug!r} already exists", field="slug") from None
            self.db.execute("INSERT INTO groups (id, account_id, name, managed, created_at) "
                            "VALUES (:id, :a, :n, 1, :t)", {"id": _new_id(), "a": aid, "n": EVERYONE, "t": t})
            self.db.execute("INSERT INTO providers (id, account_id, type, name, created_at) "
                            "VALUES (:id, :a, 'email', 'Email', :t)", {"id": _new_id(), "a": aid, "t": t})
        return self.account(aid)

    def account(self, account_id: str) -> Row:
        row = self.db.fetchone("SELECT * FROM accounts WHERE id = :id", {"id": account_id})
        if row is None:
            raise NotFound.of("account", account_id)
        return row

    def account_by_slug(self, slug: str) -> Row | None:
        return self.db.fetchone("SELECT * FROM accounts WHERE slug = :s", {"s": slug})

    def accounts(self) -> list[Row]:
        return self.db.fetchall("SELECT * FROM accounts ORDER BY created_at")

    def account_settings(self, account_id: str) -> dict[str, Any]:
        return dict(json.loads(self.account(account_id)["settings"] or "{}"))

    def update_account_settings(self, account_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Apply a partial update (validated; ``None`` / ``[]`` removes a setting); connected
        clients hear of it through the change feed."""
        try:
            valid = account_settings.validate_settings(changes)
        except resources.ValidationError as e:
            raise Invalid(e.field, e.message) from None
        cur = self.account_settings(account_id)
        for key, value in valid.items():
            if value in (None, []):
                cur.pop(key, None)
            else:
                cur[key] = value
        self.db.execute("UPDATE accounts SET settings = :s WHERE id = :id", {"s": json.dumps(cur), "id": account_id})
        self._emit(Change(account_id, "account", "updated", account_id))
        return cur

    # -- actors ---------------------------------------------------------------------------------

    def create_actor(self, account_id: str, *, email: str | None, name: str | None = None,
                     type: str = "user") -> Row:
        if type not in ACTOR_TYPES:
            raise Invalid("type", f"must be one of {', '.join(ACTOR_TYPES)}")
        if email is None and type != "service_account":
            raise Invalid("email", "is required for users and admins")
        em = _email(email) if email is not None else None
        nm = _require_name("name", name) if name else (em.split("@")[0] if em else None)
        if nm is None:
            raise Invalid("name", "is required for a service account without email")
        aid = _new_id()
        t = now_ms()
        with self.db.transaction():
            try:
                self.db.execute("INSERT INTO actors (id, account_id, type, email, name, created_at) "
                                "VALUES (:id, :a, :ty, :e, :n, :t)",
                                {"id": aid, "a": account_id, "ty": type, "e": em, "n": nm, "t": t})
            except IntegrityError:
                raise Conflict(f"a user with email {em!r} already exists", field="email") from None
            if type != "service_account":
                everyone = self._everyone(account_id)
                self.db.execute("INSERT INTO memberships (account_id, group_id, actor_id, created_at) "
                                "VALUES (:a, :g, :u, :t)", {"a": account_id, "g": everyone["id"], "u": aid, "t": t})
        row = self.actor(account_id, aid)
        self._emit(Change(account_id, "actor", "created", aid, row))
        return row

    def actor(self, account_id: str, ref: str) -> Row:
        if _is_uuid(ref):
            row = self.db.fetchone("SELECT * FROM actors WHERE account_id = :a AND id = :r", {"a": account_id, "r": ref})
        else:
            row = self.db.fetchone("SELECT * FROM actors WHERE account_id = :a AND email = :r",
                                   {"a": account_id, "r": str(ref).strip().lower()})
        if row is None:
            raise NotFound.of("user", ref)
        return row

    def actor_by_email(self, account_id: str, email: str) -> Row | None:
        return self.db.fetchone("SELECT * FROM actors WHERE account_id = :a AND email = :e",
                                {"a": account_id, "e": email.strip().lower()})

    def actors(self, account_id: str, *, limit: int = 100, cursor: str | None = None,
               email: str | None = None) -> Page:
        sql = "SELECT * FROM actors WHERE account_id = :a"
        params: dict[str, Any] = {"a": account_id}
        if email:
            sql += " AND email = :e"
            params["e"] = email.strip().lower()
        return self._page(sql, params, limit, cursor)

    def actor_groups(self, actor_id: str) -> list[Row]:
        return self.db.fetchall("SELECT g.* FROM groups g JOIN memberships m ON m.group_id = g.id "
                                "WHERE m.actor_id = :u ORDER BY g.name", {"u": actor_id})

    def update_actor(self, account_id: str, ref: str, *, name: str | None = None, type: str | None = None,
                     disabled: bool | None = None) -> Row:
        before = self.actor(account_id, ref)
        fields: dict[str, Any] = {}
        if name is not None:
            fields["name"] = _require_name("name", name)
        if type is not None:
            if type not in ACTOR_TYPES:
                raise Invalid("type", f"must be one of {', '.join(ACTOR_TYPES)}")
            if (type == "service_account") != (before["type"] == "service_account"):
                raise Invalid("type", "cannot turn a user into a service account or back")
            fields["type"] = type
        if disabled is not None:
            if not isinstance(disabled, bool):
                raise Invalid("disabled", "must be true or false")
            fields["disabled"] = int(disabled)
        if fields:
            sets = ", ".join(f"{k} = :{k}" for k in fields)
            self.db.execute(f"UPDATE actors SET {sets} WHERE id = :id", {**fields, "id": before["id"]})
        row = self.actor(account_id, before["id"])
        self._emit(Change(account_id, "actor", "updated", row["id"], row, before))
        return row

    def delete_actor(self, account_id: str, ref: str) -> None:
        row = self.actor(account_id, ref)
        self.db.execute("DELETE FROM actors WHERE id = :id", {"id": row["id"]})
        self._emit(Change(account_id, "actor", "deleted", row["id"], None, row))

    # -- groups and memberships -----------------------------------------------------------------

    def _everyone(self, account_id: str) -> Row:
        row = self.db.fetchone("SELECT * FROM groups WHERE account_id = :a AND managed = 1", {"a": account_id})
        assert row is not None, "every account has its managed group"
        return row

    def create_group(self, account_id: str, name: str) -> Row:
        name = _require_name("name", name)
        gid = _new_id()
        try:
            self.db.execute("INSERT INTO groups (id, account_id, name, created_at) VALUES (:id, :a, :n, :t)",
                            {"id": gid, "a": account_id, "n": name, "t": now_ms()})
        except IntegrityError as e:
            raise self._unique(e, "name", name, "group") from None
        row = self.group(account_id, gid)
        self._emit(Change(account_id, "group", "created", gid, row))
        return row

    def group(self, account_id: str, ref: str) -> Row:
        col = "id" if _is_uuid(ref) else "name"
        row = self.db.fetchone(
            f"SELECT g.*, (SELECT COUNT(*) FROM memberships m WHERE m.group_id = g.id) AS member_count "
            f"FROM groups g WHERE g.account_id = :a AND g.{col} = :r", {"a": account_id, "r": ref})
        if row is None:
            raise NotFound.of("group", ref)
        return row

    def groups(self, account_id: str, *, limit: int = 100, cursor: str | None = None) -> Page:
        return self._page("SELECT g.*, (SELECT COUNT(*) FROM memberships m WHERE m.group_id = g.id) AS member_count "
                          "FROM groups g WHERE g.account_id = :a", {"a": account_id}, limit, cursor, alias="g")

    def rename_group(self, account_id: str, ref: str, name: str) -> Row:
        g = self.group(account_id, ref)
        if g["managed"]:
            raise Conflict(f"the managed group {g['name']!r} cannot be renamed")
        name = _require_name("name", name)
        try:
            self.db.execute("UPDATE groups SET name = :n WHERE id = :id", {"n": name, "id": g["id"]})
        except IntegrityError as e:
            raise self._unique(e, "name", name, "group") from None
        return self.group(account_id, g["id"])

    def delete_group(self, account_id: str, ref: str) -> None:
        g = self.group(account_id, ref)
        if g["managed"]:
            raise Conflict(f"the managed group {g['name']!r} cannot be removed")
        affected = self._policy_resources_of_group(g["id"])
        self.db.execute("DELETE FROM groups WHERE id = :id", {"id": g["id"]})
        self._emit(Change(account_id, "group", "deleted", g["id"], None, {**g, "resource_ids": affected}))

    def _policy_resources_of_group(self, group_id: str) -> list[str]:
        return [r["resource_id"] for r in self.db.fetchall(
            "SELECT DISTINCT resource_id FROM policies WHERE group_id = :g", {"g": group_id})]

    def members(self, account_id: str, group_ref: str, *, limit: int = 100, cursor: str | None = None) -> Page:
        g = self.group(account_id, group_ref)
        return self._page("SELECT a.* FROM actors a JOIN memberships m ON m.actor_id = a.id WHERE m.group_id = :g",
                          {"g": g["id"]}, limit, cursor, alias="a")

    def add_member(self, account_id: str, group_ref: str, user_ref: str) -> tuple[Row, Row]:
        g = self.group(account_id, group_ref)
        u = self.actor(account_id, user_ref)
        if g["managed"]:
            raise Conflict(f"membership of {g['name']!r} is managed: every user is a member")
        try:
            self.db.execute("INSERT INTO memberships (account_id, group_id, actor_id, created_at) "
                            "VALUES (:a, :g, :u, :t)", {"a": account_id, "g": g["id"], "u": u["id"], "t": now_ms()})
        except IntegrityError:
            raise Conflict(f"{u['email'] or u['name']} is already a member of {g['name']!r}") from None
        self._emit(Change(account_id, "membership", "created", g["id"], {"group_id": g["id"], "actor_id": u["id"]}))
        return g, u

    def remove_member(self, account_id: str, group_ref: str, user_ref: str) -> None:
        g = self.group(account_id, group_ref)
        u = self.actor(account_id, user_ref)
        if g["managed"]:
            raise Conflict(f"membership of {g['name']!r} is managed: every user is a member")
        n = self.db.execute("DELETE FROM memberships WHERE group_id = :g AND actor_id = :u",
                            {"g": g["id"], "u": u["id"]})
        if not n:
            raise NotFound(f"{u['email'] or u['name']} is not a member of {g['name']!r}")
        self._emit(Change(account_id, "membership", "deleted", g["id"], None, {"group_id": g["id"], "actor_id": u["id"]}))

    def memberships(self, account_id: str, *, group: str | None = None, user: str | None = None,
                    limit: int = 100, cursor: str | None = None) -> Page:
        sql = ("SELECT m.created_at, m.group_id || ':' || m.actor_id AS id, g.id AS group_id, g.name AS group_name, "
               "a.id AS actor_id, a.email AS actor_email FROM memberships m JOIN groups g ON g.id = m.group_id "
               "JOIN actors a ON a.id = m.actor_id WHERE m.account_id = :acc")
        params: dict[str, Any] = {"acc": account_id}
        if group:
            sql += " AND g.id = :g"
            params["g"] = self.group(account_id, group)["id"]
        if user:
            sql += " AND a.id = :u"
            params["u"] = self.actor(account_id, user)["id"]
        c = decode_cursor(cursor)
        if c is not None:
            sql += " AND (m.created_at > :c_at OR (m.created_at = :c_at AND m.group_id || ':' || m.actor_id > :c_id))"
            params.update(c_at=c[0], c_id=c[1])
        rows = self.db.fetchall(sql + " ORDER BY m.created_at, id LIMIT :lim", {**params, "lim": limit + 1})
        nxt = None
        if len(rows) > limit:
            rows = rows[:limit]
            nxt = encode_cursor(rows[-1]["created_at"], rows[-1]["id"])
        return Page(rows, nxt)

    # -- sites ----------------------------------------------------------------------------------

    _SITE_SELECT = ("SELECT s.*, (SELECT COUNT(*) FROM resources r WHERE r.site_id = s.id) AS resource_count, "
                    "(SELECT COUNT(*) FROM devices d WHERE d.site_id = s.id AND d.type = 'gateway') AS gateway_count "
                    "FROM sites s")

    def create_site(self, account_id: str, name: str) -> Row:
        name = _require_name("name", name)
        sid = _new_id()
        try:
            self.db.execute("INSERT INTO sites (id, account_id, name, created_at) VALUES (:id, :a, :n, :t)",
                            {"id": sid, "a": account_id, "n": name, "t": now_ms()})
        except IntegrityError as e:
            raise self._unique(e, "name", name, "site") from None
        return self.site(account_id, sid)

    def site(self, account_id: str, ref: str) -> Row:
        col = "id" if _is_uuid(ref) else "name"
        row = self.db.fetchone(f"{self._SITE_SELECT} WHERE s.account_id = :a AND s.{col} = :r",
                               {"a": account_id, "r": ref})
        if row is None:
            raise NotFound.of("site", ref)
        return row

    def sites(self, account_id: str, *, limit: int = 100, cursor: str | None = None) -> Page:
        return self._page(f"{self._SITE_SELECT} WHERE s.account_id = :a", {"a": account_id}, limit, cursor, alias="s")

    def rename_site(self, account_id: str, ref: str, name: str) -> Row:
        s = self.site(account_id, ref)
        name = _require_name("name", name)
        try:
            self.db.execute("UPDATE sites SET name = :n WHERE id = :id", {"n": name, "id": s["id"]})
        except IntegrityError as e:
            raise self._unique(e, "name", name, "site") from None
        return self.site(account_id, s["id"])

    def delete_site(self, account_id: str, ref: str) -> None:
        s = self.site(account_id, ref)
        if s["resource_count"]:
            raise Conflict(f"site {s['name']!r} still has {s['resource_count']} resource(s); remove them first")
        self.db.execute("DELETE FROM sites WHERE id = :id", {"id": s["id"]})
        self._emit(Change(account_id, "site", "deleted", s["id"], None, s))

    # -- resources ------------------------------------------------------------------------------

    _RESOURCE_SELECT = "SELECT r.*, s.name AS site_name FROM resources r JOIN sites s ON s.id = r.site_id"

    def _validated_resource(self, account_id: str, data: dict[str, Any]) -> dict[str, Any]:
        try:
            return dict(resources.validate_resource(
                type=data.get("type"), address=data.get("address"), name=cast(str, data.get("name")),
                address_description=data.get("address_description"), filters=data.get("filters") or []))
        except resources.ValidationError as e:
            raise Invalid(e.field, e.message) from None

    def create_resource(self, account_id: str, data: dict[str, Any]) -> Row:
        if not data.get("site"):
            raise Invalid("site", "is required (a site id or name)")
        site = self.site(account_id, str(data["site"]))
        v = self._validated_resource(account_id, data)
        if v["type"] == "internet" and self.db.fetchone(
                "SELECT id FROM resources WHERE account_id = :a AND type = 'internet'", {"a": account_id}):
            raise Conflict("the account already has an internet resource", field="type")
        rid = _new_id()
        t = now_ms()
        try:
            self.db.execute(
                "INSERT INTO resources (id, account_id, site_id, name, type, address, address_description, "
                "filters, created_at, updated_at) VALUES (:id, :a, :s, :n, :ty, :ad, :d, :f, :t, :t)",
                {"id": rid, "a": account_id, "s": site["id"], "n": v["name"], "ty": v["type"],
                 "ad": v.get("address"), "d": v.get("address_description"), "f": json.dumps(v.get("filters", [])),
                 "t": t})
        except IntegrityError as e:
            raise self._unique(e, "name", v["name"], "resource") from None
        row = self.resource(account_id, rid)
        self._emit(Change(account_id, "resource", "created", rid, row))
        return row

    def resource(self, account_id: str, ref: str) -> Row:
        col = "id" if _is_uuid(ref) else "name"
        row = self.db.fetchone(f"{self._RESOURCE_SELECT} WHERE r.account_id = :a AND r.{col} = :r",
                               {"a": account_id, "r": ref})
        if row is None:
            raise NotFound.of("resource", ref)
        return _decode_resource(row)

    def resources(self, account_id: str, *, site: str | None = None, limit: int = 100,
                  cursor: str | None = None) -> Page:
        sql = f"{self._RESOURCE_SELECT} WHERE r.account_id = :a"
        params: dict[str, Any] = {"a": account_id}
        if site:
            sql += " AND r.site_id = :s"
            params["s"] = self.site(account_id, site)["id"]
        page = self._page(sql, params, limit, cursor, alias="r")
        return Page([_decode_resource(r) for r in page.rows], page.next_cursor)

    def resources_by_ids(self, account_id: str, ids: Iterable[str]) -> list[Row]:
        ids = list(ids)
        if not ids:
            return []
        marks = ", ".join(f":i{n}" for n in range(len(ids)))
        rows = self.db.fetchall(f"{self._RESOURCE_SELECT} WHERE r.account_id = :a AND r.id IN ({marks})",
                                {"a": account_id, **{f"i{n}": v for n, v in enumerate(ids)}})
        return [_decode_resource(r) for r in rows]

    def update_resource(self, account_id: str, ref: str, data: dict[str, Any]) -> Row:
        before = self.resource(account_id, ref)
        merged = {k: before[k] for k in ("name", "type", "address", "address_description", "filters")}
        for k in ("name", "type", "address", "address_description", "filters"):
            if k in data:
                merged[k] = data[k]
        if "address" in data and "type" not in data:
            merged["type"] = None  # re-infer from the new address
        v = self._validated_resource(account_id, merged)
        site_id = before["site_id"]
        if data.get("site"):
            site_id = self.site(account_id, str(data["site"]))["id"]
        try:
            self.db.execute(
                "UPDATE resources SET name = :n, type = :ty, address = :ad, address_description = :d, filters = :f, "
                "site_id = :s, updated_at = :t WHERE id = :id",
                {"n": v["name"], "ty": v["type"], "ad": v.get("address"), "d": v.get("address_description"),
                 "f": json.dumps(v.get("filters", [])), "s": site_id, "t": now_ms(), "id": before["id"]})
        except IntegrityError as e:
            raise self._unique(e, "name", v["name"], "resource") from None
        row = self.resource(account_id, before["id"])
        self._emit(Change(account_id, "resource", "updated", row["id"], row, before))
        return row

    def delete_resource(self, account_id: str, ref: str) -> None:
        row = self.resource(account_id, ref)
        self.db.execute("DELETE FROM resources WHERE id = :id", {"id": row["id"]})
        self._emit(Change(account_id, "resource", "deleted", row["id"], None, row))

    # -- policies -------------------------------------------------------------------------------

    _POLICY_SELECT = ("SELECT p.*, g.name AS group_name, r.name AS resource_name FROM policies p "
                      "JOIN groups g ON g.id = p.group_id JOIN resources r ON r.id = p.resource_id")

    def _validated_conditions(self, conditions: Any, account_id: str | None = None) -> list[dict[str, Any]]:
        if conditions is None:
            return []
        if not isinstance(conditions, list):
            raise Invalid("conditions", "must be a list")
        out = []
        for i, c in enumerate(conditions):
            try:
                out.append(engine.validate_condition(c))
            except resources.ValidationError as e:
                field = e.field if e.field.startswith("conditions") else f"conditions[{i}].{e.field}"
                raise Invalid(field, e.message) from None
        if account_id is not None:
            for i, c in enumerate(out):
                if c["property"] == "provider_id":
                    c["values"] = [self._provider_ref(account_id, v, f"conditions[{i}].values") for v in c["values"]]
        return out

    def _provider_ref(self, account_id: str, ref: str, field: str) -> str:
        """Provider conditions store ids; admins may name the provider instead."""
        col = "id" if _is_uuid(ref) else "name"
        row = self.db.fetchone(f"SELECT id FROM providers WHERE account_id = :a AND {col} = :r",
                               {"a": account_id, "r": ref})
        if row is None:
            raise Invalid(field, f"no sign-in provider {ref!r} in this account")
        return str(row["id"])

    def create_policy(self, account_id: str, *, group: str, resource: str, description: str | None = None,
                      conditions: Any = None, disabled: bool = False) -> Row:
        if not group:
            raise Invalid("group", "is required (a group id or name)")
        if not resource:
            raise Invalid("resource", "is required (a resource id or name)")
        g = self.group(account_id, str(group))
        r = self.resource(account_id, str(resource))
        conds = self._validated_conditions(conditions, account_id)
        if description is not None and (not isinstance(description, str) or len(description) > 1024):
            raise Invalid("description", "must be a string of at most 1024 characters")
        if not isinstance(disabled, bool):
            raise Invalid("disabled", "must be true or false")
        pid = _new_id()
        self.db.execute("INSERT INTO policies (id, account_id, group_id, resource_id, description, conditions, "
                        "disabled, created_at) VALUES (:id, :a, :g, :r, :d, :c, :x, :t)",
                        {"id": pid, "a": account_id, "g": g["id"], "r": r["id"], "d": description,
                         "c": json.dumps(conds), "x": int(disabled), "t": now_ms()})
        row = self.policy(account_id, pid)
        self._emit(Change(account_id, "policy", "created", pid, row))
        return row

    def policy(self, account_id: str, pid: str) -> Row:
        if not _is_uuid(pid):
            raise NotFound.of("policy", pid)
        row = self.db.fetchone(f"{self._POLICY_SELECT} WHERE p.account_id = :a AND p.id = :id",
                               {"a": account_id, "id": pid})
        if row is None:
            raise NotFound.of("policy", pid)
        return _decode_policy(row)

    def policies(self, account_id: str, *, group: str | None = None, resource: str | None = None,
                 limit: int = 100, cursor: str | None = None) -> Page:
        sql = f"{self._POLICY_SELECT} WHERE p.account_id = :a"
        params: dict[str, Any] = {"a": account_id}
        if group:
            sql += " AND p.group_id = :g"
            params["g"] = self.group(account_id, group)["id"]
        if resource:
            sql += " AND p.resource_id = :r"
            params["r"] = self.resource(account_id, resource)["id"]
        page = self._page(sql, params, limit, cursor, alias="p")
        return Page([_decode_policy(r) for r in page.rows], page.next_cursor)

    def update_policy(self, account_id: str, pid: str, data: dict[str, Any]) -> Row:
        before = self.policy(account_id, pid)
        fields: dict[str, Any] = {}
        if "description" in data:
            d = data["description"]
            if d is not None and (not isinstance(d, str) or len(d) > 1024):
                raise Invalid("description", "must be a string of at most 1024 characters")
            fields["description"] = d
        if "conditions" in data:
            fields["conditions"] = json.dumps(self._validated_conditions(data["conditions"], account_id))
        if "disabled" in data:
            if not isinstance(data["disabled"], bool):
                raise Invalid("disabled", "must be true or false")
            fields["disabled"] = int(data["disabled"])
        if fields:
            sets = ", ".join(f"{k} = :{k}" for k in fields)
            self.db.execute(f"UPDATE policies SET {sets} WHERE id = :id", {**fields, "id": before["id"]})
        row = self.policy(account_id, before["id"])
        self._emit(Change(account_id, "policy", "updated", row["id"], row, before))
        return row

    def delete_policy(self, account_id: str, pid: str) -> None:
        row = self.policy(account_id, pid)
        self.db.execute("DELETE FROM policies WHERE id = :id", {"id": row["id"]})
        self._emit(Change(account_id, "policy", "deleted", row["id"], None, row))

    # -- decisions ------------------------------------------------------------------------------

    def candidate_policies(self, actor_id: str, resource_id: str) -> list[engine.PolicyInput]:
        """Policies of the resource whose group the actor belongs to (disabled ones included)."""
        rows = self.db.fetchall(
            "SELECT p.id, p.group_id, p.resource_id, p.conditions, p.disabled, p.description FROM policies p "
            "JOIN memberships m ON m.group_id = p.group_id WHERE p.resource_id = :r AND m.actor_id = :u",
            {"r": resource_id, "u": actor_id})
        return [engine.PolicyInput(id=r["id"], group_id=r["group_id"], resource_id=r["resource_id"],
                                     conditions=tuple(json.loads(r["conditions"])), disabled=bool(r["disabled"]),
                                     description=r["description"]) for r in rows]

    def decide(self, actor_id: str, resource_id: str, ctx: engine.EvalContext) -> engine.Decision:
        return engine.evaluate(self.candidate_policies(actor_id, resource_id), ctx)

    def accessible_resource_ids(self, actor_id: str) -> set[str]:
        """Resources some enabled policy of the actor's groups names (conditions not yet applied)."""
        return {r["resource_id"] for r in self.db.fetchall(
            "SELECT DISTINCT p.resource_id FROM policies p JOIN memberships m ON m.group_id = p.group_id "
            "WHERE m.actor_id = :u AND p.disabled = 0", {"u": actor_id})}

    def record_decision(self, account_id: str, *, result: str, reason: str, actor: Row | None,
                        resource: Row | None, device_id: str | None = None, gateway_id: str | None = None,
                        policy_id: str | None = None, violated: Iterable[str] = (),
                        remote_ip: str | None = None) -> str:
        did = _new_id()
        self.db.execute(
            "INSERT INTO decisions (id, account_id, at, result, reason, actor_id, actor_email, device_id, "
            "resource_id, resource_name, gateway_id, policy_id, violated_properties, remote_ip) VALUES "
            "(:id, :a, :at, :res, :rea, :u, :ue, :dev, :r, :rn, :gw, :p, :v, :ip)",
            {"id": did, "a": account_id, "at": now_ms(), "res": result, "rea": reason,
             "u": actor["id"] if actor else None, "ue": actor["email"] if actor else None, "dev": device_id,
             "r": resource["id"] if resource else None, "rn": resource["name"] if resource else None,
             "gw": gateway_id, "p": policy_id, "v": json.dumps(list(violated)), "ip": remote_ip})
        return did

    def decisions(self, account_id: str, *, result: str | None = None, user: str | None = None,
                  resource: str | None = None, limit: int = 100, cursor: str | None = None) -> Page:
        sql = "SELECT * FROM decisions WHERE account_id = :a"
        params: dict[str, Any] = {"a": account_id}
        if result:
            if result not in ("allow", "deny"):
                raise Invalid("result", "must be allow or deny")
            sql += " AND result = :res"
            params["res"] = result
        if user:
            sql += " AND (actor_id = :u OR actor_email = :ue)"
            params.update(u=user, ue=user.strip().lower())
        if resource:
            sql += " AND (resource_id = :r OR resource_name = :r)"
            params["r"] = resource
        c = decode_cursor(cursor)
        if c is not None:
            sql += " AND (at < :c_at OR (at = :c_at AND id < :c_id))"
            params.update(c_at=c[0], c_id=c[1])
        rows = self.db.fetchall(sql + " ORDER BY at DESC, id DESC LIMIT :lim", {**params, "lim": limit + 1})
        nxt = None
        if len(rows) > limit:
            rows = rows[:limit]
            nxt = encode_cursor(rows[-1]["at"], rows[-1]["id"])
        for r in rows:
            r["violated_properties"] = json.loads(r["violated_properties"])
        return Page(rows, nxt)

    # -- providers ------------------------------------------------------------------------------

    def providers(self, account_id: str) -> list[Row]:
        rows = self.db.fetchall("SELECT * FROM providers WHERE account_id = :a ORDER BY created_at", {"a": account_id})
        for r in rows:
            r["config"] = json.loads(r["config"])
        return rows

    def provider(self, account_id: str, ref: str) -> Row:
        col = "id" if _is_uuid(ref) else "name"
        row = self.db.fetchone(f"SELECT * FROM providers WHERE account_id = :a AND {col} = :r",
                               {"a": account_id, "r": ref})
        if row is None:
            raise NotFound.of("provider", ref)
        row["config"] = json.loads(row["config"])
        return row

    # -- tokens ---------------------------------------------------------------------------------

    def create_token(self, account_id: str | None, *, type: str, name: str | None = None,
                     actor: str | None = None, site: str | None = None, expires_in: int | None = None,
                     provider_id: str | None = None, nonce: str = "") -> tuple[Row, str]:
        """Mint a token; returns its row and the secret text (shown once, never stored)."""
        if type not in TOKEN_TYPES:
            raise Invalid("type", f"must be one of {', '.join(TOKEN_TYPES)}")
        if expires_in is not None and (not isinstance(expires_in, int) or isinstance(expires_in, bool)
                                       or expires_in <= 0):
            raise Invalid("expires_in", "must be a positive number of seconds")
        if name is not None:
            name = _require_name("name", name)
        actor_id = site_id = None
        if type == "gateway":
            if not site:
                raise Invalid("site", "a gateway token belongs to a site: give the site id or name")
            site_id = self.site(account_id, site)["id"] if account_id else None
        elif site:
            raise Invalid("site", f"only gateway tokens belong to a site, not {type} tokens")
        if type == "client":
            if not actor:
                raise Invalid("user", "a client token speaks for a user: give the user id or email")
            a = self.actor(account_id, actor) if account_id else None
            actor_id = a["id"] if a else None
            if expires_in is None:
                expires_in = DEFAULT_CLIENT_SESSION_S
        elif type == "api":
            if actor:
                a = self.actor(account_id, actor) if account_id else None
                if a and a["type"] != "admin" and a["type"] != "service_account":
                    raise Invalid("user", "API tokens are for admins and service accounts")
                actor_id = a["id"] if a else None
        elif actor:
            raise Invalid("user", f"{type} tokens do not belong to a user")
        if type == "relay":
            account_id = None  # relays serve every account
        sec = tokens.mint(nonce)
        t = now_ms()
        self.db.execute(
            "INSERT INTO tokens (id, account_id, type, name, actor_id, site_id, provider_id, secret_salt, "
            "secret_hash, created_at, expires_at) VALUES (:id, :a, :ty, :n, :u, :s, :p, :salt, :h, :t, :e)",
            {"id": sec.id, "a": account_id, "ty": type, "n": name, "u": actor_id, "s": site_id, "p": provider_id,
             "salt": sec.salt, "h": sec.hash, "t": t, "e": t + expires_in * 1000 if expires_in else None})
        row = self.token(account_id, sec.id)
        return row, (sec.fragment if nonce else sec.encoded)

    _TOKEN_SELECT = ("SELECT t.id, t.account_id, t.type, t.name, t.actor_id, t.site_id, t.provider_id, t.created_at, "
                     "t.expires_at, t.revoked_at, t.last_used_at, a.email AS actor_email, s.name AS site_name "
                     "FROM tokens t LEFT JOIN actors a ON a.id = t.actor_id LEFT JOIN sites s ON s.id = t.site_id")

    def token(self, account_id: str | None, tid: str) -> Row:
        if not _is_uuid(tid):
            raise NotFound.of("token", tid)
        row = self.db.fetchone(f"{self._TOKEN_SELECT} WHERE t.id = :id AND (t.account_id = :a OR t.account_id IS NULL)",
                               {"id": tid, "a": account_id})
        if row is None:
            raise NotFound.of("token", tid)
        return row

    def tokens(self, account_id: str, *, type: str | None = None, limit: int = 100,
               cursor: str | None = None) -> Page:
        sql = f"{self._TOKEN_SELECT} WHERE (t.account_id = :a OR t.account_id IS NULL)"
        params: dict[str, Any] = {"a": account_id}
        if type:
            if type not in TOKEN_TYPES:
                raise Invalid("type", f"must be one of {', '.join(TOKEN_TYPES)}")
            sql += " AND t.type = :ty"
            params["ty"] = type
        return self._page(sql, params, limit, cursor, alias="t")

    def revoke_token(self, account_id: str | None, tid: str) -> Row:
        row = self.token(account_id, tid)
        if row["revoked_at"] is None:
            self.db.execute("UPDATE tokens SET revoked_at = :t WHERE id = :id", {"t": now_ms(), "id": row["id"]})
        row = self.token(account_id, tid)
        self._emit(Change(row["account_id"] or "", "token", "revoked", row["id"], row))
        return row

    def verify_token(self, presented: str | None, types: Iterable[str], *, touch: bool = True) -> TokenInfo:
        """Check a presented token; raises Unauthorized with a reason that is safe to show."""
        if not presented:
            raise Unauthorized("missing token")
        parsed = tokens.parse(presented)
        if parsed is None:
            raise Unauthorized("invalid token")
        row = self.db.fetchone("SELECT * FROM tokens WHERE id = :id", {"id": parsed.id})
        if row is None or not tokens.matches(parsed, row["secret_salt"], row["secret_hash"]):
            raise Unauthorized("invalid token")
        types = tuple(types)
        if row["type"] not in types:
            raise Unauthorized(f"a {row['type']} token cannot be used here (expected {' or '.join(types)})")
        t = now_ms()
        if row["revoked_at"] is not None:
            raise Unauthorized("token revoked")
        if row["expires_at"] is not None and row["expires_at"] <= t:
            raise Unauthorized("token expired")
        if touch and (row["last_used_at"] is None or t - row["last_used_at"] > 60_000):
            # at most one write per minute per token: the API's hot path stays read-only
            self.db.execute("UPDATE tokens SET last_used_at = :t WHERE id = :id", {"t": t, "id": row["id"]})
        return TokenInfo(row["id"], row["type"], row["account_id"], row["actor_id"], row["site_id"],
                         row["provider_id"], row["expires_at"], row)

    # -- devices --------------------------------------------------------------------------------

    def upsert_device(self, account_id: str, *, type: str, external_id: str, name: str,
                      public_key: str | None, actor_id: str | None = None, site_id: str | None = None,
                      remote_ip: str | None = None, version: str | None = None) -> Row:
        """Find the device by (type, external id) or create it with fresh tunnel addresses."""
        from firezone.portal.domain import addresses

        t = now_ms()
        with self.db.transaction():
            row = self.db.fetchone("SELECT * FROM devices WHERE account_id = :a AND type = :ty AND external_id = :x",
                                   {"a": account_id, "ty": type, "x": external_id})
            if row is not None:
                self.db.execute(
                    "UPDATE devices SET name = :n, public_key = :pk, actor_id = COALESCE(:u, actor_id), "
                    "site_id = COALESCE(:s, site_id), last_seen_at = :t, last_seen_remote_ip = :ip, "
                    "last_seen_version = :v WHERE id = :id",
                    {"n": name, "pk": public_key, "u": actor_id, "s": site_id, "t": t, "ip": remote_ip,
                     "v": version, "id": row["id"]})
                return self.device(account_id, row["id"])
            used4 = _TakenAddresses(self.db, account_id, "ipv4")
            used6 = _TakenAddresses(self.db, account_id, "ipv6")
            did = _new_id()
            self.db.execute(
                "INSERT INTO devices (id, account_id, type, external_id, name, actor_id, site_id, public_key, ipv4, "
                "ipv6, created_at, last_seen_at, last_seen_remote_ip, last_seen_version) VALUES "
                "(:id, :a, :ty, :x, :n, :u, :s, :pk, :v4, :v6, :t, :t, :ip, :v)",
                {"id": did, "a": account_id, "ty": type, "x": external_id, "n": name, "u": actor_id, "s": site_id,
                 "pk": public_key, "v4": addresses.allocate_ip(TUNNEL_V4, used4, SYSTEM_RNG),
                 "v6": addresses.allocate_ip(TUNNEL_V6, used6, SYSTEM_RNG), "t": t, "ip": remote_ip, "v": version})
        return self.device(account_id, did)

    def device(self, account_id: str, did: str) -> Row:
        row = self.db.fetchone("SELECT * FROM devices WHERE account_id = :a AND id = :id", {"a": account_id, "id": did})
        if row is None:
            raise NotFound.of("device", did)
        return row

    def devices(self, account_id: str, *, type: str | None = None, limit: int = 100,
                cursor: str | None = None) -> Page:
        sql = "SELECT * FROM devices WHERE account_id = :a"
        params: dict[str, Any] = {"a": account_id}
        if type:
            sql += " AND type = :ty"
            params["ty"] = type
        return self._page(sql, params, limit, cursor)

    def touch_device(self, device_id: str, *, remote_ip: str | None = None) -> None:
        self.db.execute("UPDATE devices SET last_seen_at = :t, last_seen_remote_ip = COALESCE(:ip, last_seen_remote_ip) "
                        "WHERE id = :id", {"t": now_ms(), "ip": remote_ip, "id": device_id})

    # -- providers: changes (sign-in) -----------------------------------------------------------

    def create_provider(self, account_id: str, *, type: str, name: str, config: dict[str, Any]) -> Row:
        if type not in ("email", "oidc"):
            raise Invalid("type", "must be email or oidc")
        name = _require_name("name", name)
        pid = _new_id()
        try:
            self.db.execute("INSERT INTO providers (id, account_id, type, name, config, created_at) "
                            "VALUES (:id, :a, :ty, :n, :c, :t)",
                            {"id": pid, "a": account_id, "ty": type, "n": name, "c": json.dumps(config),
                             "t": now_ms()})
        except IntegrityError as e:
            raise self._unique(e, "name", name, "provider") from None
        row = self.provider(account_id, pid)
        self._emit(Change(account_id, "provider", "created", pid, None))
        return row

    def update_provider(self, account_id: str, ref: str, *, config: dict[str, Any] | None = None,
                        disabled: bool | None = None) -> Row:
        row = self.provider(account_id, ref)
        if config is not None:
            self.db.execute("UPDATE providers SET config = :c WHERE id = :id",
                            {"c": json.dumps(config), "id": row["id"]})
        if disabled is not None:
            self.db.execute("UPDATE providers SET disabled = :d WHERE id = :id",
                            {"d": int(disabled), "id": row["id"]})
        self._emit(Change(account_id, "provider", "updated", row["id"], None))
        return self.provider(account_id, row["id"])

    def delete_provider(self, account_id: str, ref: str) -> None:
        row = self.provider(account_id, ref)
        self.db.execute("DELETE FROM providers WHERE id = :id", {"id": row["id"]})
        self._emit(Change(account_id, "provider", "deleted", row["id"], None))

    # -- browser sessions and sign-ins in progress ----------------------------------------------

    def create_web_session(self, account_id: str, *, actor_id: str, provider_id: str | None, secret_hash: str,
                           expires_in: int, remote_ip: str | None = None, user_agent: str | None = None) -> Row:
        sid = _new_id()
        t = now_ms()
        self.db.execute("DELETE FROM web_sessions WHERE expires_at < :old", {"old": t - 86400_000})
        self.db.execute(
            "INSERT INTO web_sessions (id, account_id, actor_id, provider_id, secret_hash, remote_ip, user_agent, "
            "created_at, expires_at) VALUES (:id, :a, :u, :p, :h, :ip, :ua, :t, :e)",
            {"id": sid, "a": account_id, "u": actor_id, "p": provider_id, "h": secret_hash, "ip": remote_ip,
             "ua": (user_agent or "")[:255] or None, "t": t, "e": t + expires_in * 1000})
        row = self.web_session(sid)
        assert row is not None
        return row

    def web_session(self, sid: str) -> Row | None:
        if not _is_uuid(sid):
            return None
        return self.db.fetchone("SELECT * FROM web_sessions WHERE id = :id", {"id": sid})

    def revoke_web_session(self, sid: str) -> None:
        self.db.execute("UPDATE web_sessions SET revoked_at = :t WHERE id = :id AND revoked_at IS NULL",
                        {"t": now_ms(), "id": sid})

    def create_sign_in_flow(self, account_id: str, *, provider_id: str, secret_hash: str, expires_in: float,
                            data: dict[str, Any], email: str | None = None, code_hash: str | None = None) -> Row:
        fid = _new_id()
        t = now_ms()
        with self.db.transaction():
            # flows long past their end are only kept for the per-address mail limit
            self.db.execute("DELETE FROM sign_in_flows WHERE expires_at < :old AND created_at < :old",
                            {"old": t - 3600_000})
            self.db.execute(
                "INSERT INTO sign_in_flows (id, account_id, provider_id, secret_hash, email, code_hash, data, "
                "created_at, expires_at) VALUES (:id, :a, :p, :h, :e, :c, :d, :t, :x)",
                {"id": fid, "a": account_id, "p": provider_id, "h": secret_hash, "e": email, "c": code_hash,
                 "d": json.dumps(data), "t": t, "x": t + int(expires_in * 1000)})
        row = self.sign_in_flow(fid)
        assert row is not None
        return row

    def sign_in_flow(self, fid: str) -> Row | None:
        if not _is_uuid(fid):
            return None
        row = self.db.fetchone("SELECT * FROM sign_in_flows WHERE id = :id", {"id": fid})
        if row is not None:
            row["data"] = json.loads(row["data"])
        return row

    def count_email_flows(self, account_id: str, email: str, since_ms: int) -> int:
        row = self.db.fetchone("SELECT COUNT(*) AS n FROM sign_in_flows WHERE account_id = :a AND email = :e "
                               "AND created_at >= :s", {"a": account_id, "e": email, "s": since_ms})
        return int(row["n"]) if row else 0

    def end_email_flows(self, account_id: str, email: str) -> None:
        """Expire every open code of an address (a new code replaces the older ones)."""
        self.db.execute("UPDATE sign_in_flows SET expires_at = :t WHERE account_id = :a AND email = :e "
                        "AND used_at IS NULL AND expires_at > :t", {"t": now_ms(), "a": account_id, "e": email})

    def record_flow_attempt(self, fid: str) -> int:
        """Count one more code attempt; returns the new count."""
        self.db.execute("UPDATE sign_in_flows SET attempts = attempts + 1 WHERE id = :id", {"id": fid})
        row = self.db.fetchone("SELECT attempts FROM sign_in_flows WHERE id = :id", {"id": fid})
        return int(row["attempts"]) if row else 0

    def use_flow(self, fid: str) -> bool:
        """Mark a flow used; False when it already was (each flow completes at most once)."""
        t = now_ms()
        with self.db.transaction():
            row = self.db.fetchone("SELECT used_at FROM sign_in_flows WHERE id = :id", {"id": fid})
            if row is None or row["used_at"] is not None:
                return False
            self.db.execute("UPDATE sign_in_flows SET used_at = :t WHERE id = :id", {"t": t, "id": fid})
        return True


class _TakenAddresses:
    """The account's tunnel addresses as a collection backed by the unique index (no full scan)."""

    def __init__(self, db: Database, account_id: str, column: str) -> None:
        self.db, self.account_id, self.column = db, account_id, column

    def __contains__(self, address: object) -> bool:
        return self.db.fetchone(f"SELECT 1 AS x FROM devices WHERE account_id = :a AND {self.column} = :ip",
                                {"a": self.account_id, "ip": address}) is not None

    def __len__(self) -> int:
        row = self.db.fetchone("SELECT COUNT(*) AS n FROM devices WHERE account_id = :a", {"a": self.account_id})
        return int(row["n"]) if row else 0

    def __iter__(self) -> Iterator[str]:
        rows = self.db.fetchall(f"SELECT {self.column} AS ip FROM devices WHERE account_id = :a", {"a": self.account_id})
        return iter(str(r["ip"]) for r in rows)


def _decode_resource(row: Row) -> Row:
    row = dict(row)
    row["filters"] = json.loads(row["filters"]) if isinstance(row["filters"], str) else row["filters"]
    return row


def _decode_policy(row: Row) -> Row:
    row = dict(row)
    row["conditions"] = json.loads(row["conditions"]) if isinstance(row["conditions"], str) else row["conditions"]
    row["disabled"] = bool(row["disabled"])
    return row


def is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return False
