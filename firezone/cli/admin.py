"""Admin verbs (``fz user|group|site|resource|policy|token|audit``): clients of the portal REST API.

Nothing here touches the portal database; every command is one or a few requests described in
docs/api.md. The portal URL comes from ``--portal`` / ``FIREZONE_PORTAL_URL`` (or
``FIREZONE_PORTAL``) / ``portal_url`` in the config file, else
from the admin sign-in that ``fz portal init`` stored; the token from ``FIREZONE_TOKEN``, else that
same stored sign-in. ``--json`` prints the ``data`` of the API answer.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import click
from rich.markup import escape

from firezone.cli.output import AppContext, CliError, kv_table

if TYPE_CHECKING:
    from firezone.portal.api_client import ApiClient, ApiError

EXIT_DENY = 3

# ---------------------------------------------------------------------------------------------
# Parsing helpers (pure; unit-tested in tests/unit/test_durations.py)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_PART = re.compile(r"(\d+)([smhdw])")
MAX_DURATION = 3650 * 86400
DURATION_HELP = "DURATION is seconds or a number with a unit: 30m, 12h, 7d, 2w (also 1h30m)."


def parse_duration(text: str) -> int:
    """Seconds in ``text``: plain seconds (``3600``) or unit parts (``30m``, ``12h``, ``1d12h``, ``2w``)."""
    t = text.strip().lower()
    if not t:
        raise ValueError("empty duration")
    if t.isdigit():
        seconds = int(t)
    else:
        pos = 0
        seconds = 0
        for m in _DURATION_PART.finditer(t):
            if m.start() != pos:
                break
            seconds += int(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if pos != len(t) or pos == 0:
            raise ValueError(f"invalid duration {text!r}: use seconds or a number with a unit "
                             "s, m, h, d, w (e.g. 30m, 12h, 7d, 2w)")
    if seconds <= 0:
        raise ValueError(f"invalid duration {text!r}: must be longer than zero")
    if seconds > MAX_DURATION:
        raise ValueError(f"invalid duration {text!r}: at most 3650d")
    return seconds


def parse_at(text: str) -> str:
    """An ISO-8601 time as an RFC 3339 UTC string; a time without an offset is taken as UTC."""
    t = text.strip()
    try:
        dt = datetime.fromisoformat(t[:-1] + "+00:00" if t[-1:] in ("Z", "z") else t)
    except ValueError:
        raise ValueError(f"invalid time {text!r}: use ISO 8601, e.g. 2026-11-25T09:30:00Z "
                         "or 2026-11-25T10:30+01:00") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_PROTOCOLS = ("tcp", "udp", "icmp")


def parse_filters(texts: Iterable[str]) -> list[dict[str, Any]]:
    """``["tcp/80", "tcp/8000-8100", "udp", "icmp"]`` as API filters, one entry per protocol."""
    by_proto: dict[str, list[str] | None] = {}
    for text in texts:
        proto, slash, ports = text.strip().lower().partition("/")
        if proto not in _PROTOCOLS:
            raise ValueError(f"invalid filter {text!r}: protocol must be tcp, udp or icmp")
        if proto == "icmp" and ports:
            raise ValueError(f"invalid filter {text!r}: icmp takes no ports")
        if slash and not ports:
            raise ValueError(f"invalid filter {text!r}: missing ports after '/'")
        if not ports:
            by_proto[proto] = None  # every port of this protocol
            continue
        parsed = [_port_range(text, p) for p in ports.split(",")]
        current = by_proto.get(proto, [])
        if current is not None:
            for p in parsed:
                if p not in current:
                    current.append(p)
            by_proto[proto] = current
    return [{"protocol": p, "ports": ports or []} for p, ports in by_proto.items()]


def _port_range(text: str, part: str) -> str:
    lo, sep, hi = part.strip().partition("-")
    try:
        a = int(lo)
        b = int(hi) if sep else a
    except ValueError:
        raise ValueError(f"invalid filter {text!r}: ports are numbers or ranges like 8000-8100") from None
    if not (1 <= a <= 65535 and 1 <= b <= 65535):
        raise ValueError(f"invalid filter {text!r}: ports are 1-65535")
    if a > b:
        raise ValueError(f"invalid filter {text!r}: range start is above its end")
    return str(a) if a == b else f"{a}-{b}"


def _click_parse(fn: Callable[[str], Any]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None or value == ():
            return value
        try:
            if isinstance(value, tuple):
                return [fn(v) for v in value]
            return fn(value)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
    return callback


def _parse_condition(text: str) -> dict[str, Any]:
    # Imported here: the policy engine is only needed by `fz policy add`, not at every start.
    from firezone.portal.domain.policies import parse_condition_cli

    cond: dict[str, Any] = parse_condition_cli(text)
    return cond


def _filters_callback(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> Any:
    if not value:
        return None
    try:
        return parse_filters(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


# ---------------------------------------------------------------------------------------------
# Talking to the portal

NOT_SIGNED_IN = ("not signed in to the portal or token rejected{why}: run `fz portal init` "
                 "or pass --portal URL / set FIREZONE_TOKEN to an admin API token")


def _client(app: AppContext) -> ApiClient:
    from firezone.portal.api_client import ApiClient

    url = app.config.get("portal")
    token = os.environ.get("FIREZONE_TOKEN") or None
    if url is None or token is None:
        from firezone import credentials

        stored = credentials.load(credentials.ADMIN) or {}
        url = url or stored.get("portal")
        token = token or stored.get("token")
    if not url:
        raise CliError("no portal configured: run `fz portal init`, pass --portal URL "
                       "or set FIREZONE_PORTAL_URL")
    url = str(url).strip()
    if not url.lower().startswith(("http://", "https://")):
        raise CliError(f"invalid portal URL {url!r}: it must start with http:// or https://")
    if not token:
        raise CliError(NOT_SIGNED_IN.format(why=""))
    return ApiClient(url, str(token))


def _api_error(e: ApiError) -> CliError:
    if e.status == 401:
        why = f" ({e.detail})" if e.detail and e.detail.lower() != "unauthorized" else ""
        return CliError(NOT_SIGNED_IN.format(why=why))
    detail = e.detail
    if e.errors and not any(str(err.get("field")) in detail for err in e.errors if isinstance(err, dict)):
        detail += " (" + "; ".join(f"{err.get('field')}: {err.get('message')}"
                                   for err in e.errors if isinstance(err, dict)) + ")"
    return CliError(detail)


class _AdminGroup(click.Group):
    """Turns every portal failure into a one-line error instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        from firezone.portal.api_client import ApiError

        try:
            return super().invoke(ctx)
        except ApiError as e:
            raise _api_error(e) from None


def _ref(value: str) -> str:
    return quote(value.strip(), safe="@")


def _data(answer: Any) -> Any:
    return answer.get("data") if isinstance(answer, dict) else answer


def json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--json`` on the command itself as well as on ``fz``."""
    def set_json(ctx: click.Context, param: click.Parameter, value: bool) -> None:
        if value and isinstance(ctx.obj, AppContext):
            ctx.obj.json = True
    return click.option("--json", "json_flag", is_flag=True, expose_value=False, is_eager=True,
                        callback=set_json, help="Print the API's data as JSON.")(f)


def limit_option(default: int | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    hint = "all" if default is None else str(default)
    return click.option("--limit", type=click.IntRange(min=1), default=default, show_default=False,
                        help=f"Show at most N items (default: {hint}).", metavar="N")


# ---------------------------------------------------------------------------------------------
# Rendering

def _name(v: Any, key: str = "name") -> Any:
    if isinstance(v, dict):
        return v.get(key) or v.get("email") or v.get("name") or v.get("id")
    return v


def _filters_text(filters: Any) -> str:
    if not filters:
        return "all traffic"
    out = []
    for f in filters:
        if not isinstance(f, dict):
            out.append(str(f))
            continue
        ports = f.get("ports") or []
        out.append(f"{f.get('protocol')}/{','.join(ports)}" if ports else str(f.get("protocol")))
    return " ".join(out)


_CLI_OPERATOR = {"is_in_cidr": "in", "is_not_in_cidr": "not_in", "is_in": "in", "is_not_in": "not_in",
                 "is_in_day_of_week_time_ranges": "in"}
_CLI_PROPERTY = {"current_utc_datetime": "time"}
_DAY_ORDER = "MTWRFSU"


def condition_text(c: Any) -> str:
    """A condition in the ``--condition`` syntax, time windows folded to ``MTWRF/09:00-17:00/TZ``."""
    if not isinstance(c, dict):
        return str(c)
    prop, op = str(c.get("property")), str(c.get("operator"))
    values = [str(v) for v in c.get("values") or []]
    if prop == "client_verified" and op == "is" and values == ["true"]:
        return "client_verified"
    if prop == "current_utc_datetime":
        days_by_window: dict[str, str] = {}
        for v in values:
            day, _, window = v.partition("/")
            days_by_window[window] = days_by_window.get(window, "") + day
        values = [";".join(f"{''.join(sorted(d, key=lambda x: _DAY_ORDER.find(x)))}/{w}"
                           for w, d in days_by_window.items())]
    return f"{_CLI_PROPERTY.get(prop, prop)} {_CLI_OPERATOR.get(op, op)} {','.join(values)}".strip()


def _conditions_text(conditions: Any) -> str | None:
    return " & ".join(condition_text(c) for c in conditions) if conditions else None


def _user_row(u: dict[str, Any]) -> dict[str, Any]:
    return {"email": u.get("email"), "name": u.get("name"), "type": u.get("type"),
            "disabled": u.get("disabled"), "groups": u.get("groups"), "created": u.get("created_at"),
            "id": u.get("id")}


def _group_row(g: dict[str, Any]) -> dict[str, Any]:
    return {"name": g.get("name"), "managed": g.get("managed"), "members": g.get("member_count"),
            "created": g.get("created_at"), "id": g.get("id")}


def _site_row(s: dict[str, Any]) -> dict[str, Any]:
    return {"name": s.get("name"), "resources": s.get("resource_count"),
            "gateways": s.get("gateway_count"), "created": s.get("created_at"), "id": s.get("id")}


def _resource_row(r: dict[str, Any]) -> dict[str, Any]:
    return {"name": r.get("name"), "type": r.get("type"), "address": r.get("address"),
            "site": _name(r.get("site")), "filters": _filters_text(r.get("filters")),
            "description": r.get("address_description"), "created": r.get("created_at"),
            "id": r.get("id")}


def _policy_row(p: dict[str, Any]) -> dict[str, Any]:
    return {"id": p.get("id"), "group": _name(p.get("group")), "resource": _name(p.get("resource")),
            "description": p.get("description"),
            "conditions": _conditions_text(p.get("conditions")),
            "disabled": p.get("disabled"), "created": p.get("created_at")}


def _token_row(t: dict[str, Any]) -> dict[str, Any]:
    return {"id": t.get("id"), "type": t.get("type"), "name": t.get("name"),
            "user": _name(t.get("actor"), "email"), "site": _name(t.get("site")),
            "created": t.get("created_at"), "expires": t.get("expires_at"),
            "revoked": t.get("revoked_at"), "last used": t.get("last_used_at")}


def _decision_row(d: dict[str, Any]) -> dict[str, Any]:
    return {"at": d.get("at"), "result": d.get("result"), "user": _name(d.get("actor"), "email"),
            "resource": _name(d.get("resource")), "reason": d.get("reason"),
            "violated": d.get("violated_properties"), "remote ip": d.get("remote_ip"),
            "policy": d.get("policy_id")}


def _show(app: AppContext, obj: Any, row: Callable[[dict[str, Any]], dict[str, Any]],
          headline: str | None = None) -> None:
    if app.json:
        app.emit(obj)
        return
    if headline:
        app.console.print(headline, highlight=False)
    app.console.print(kv_table(row(obj) if isinstance(obj, dict) else {"value": obj}))


def _list(app: AppContext, items: list[dict[str, Any]], row: Callable[[dict[str, Any]], dict[str, Any]],
          columns: list[str]) -> None:
    app.table([row(i) for i in items], columns, data=items)


def _done(app: AppContext, message: str, data: Any = None) -> None:
    if app.json:
        app.emit(data if data is not None else {"ok": True})
    else:
        app.console.print(escape(message), highlight=False)


# ---------------------------------------------------------------------------------------------
# fz user

USER_COLUMNS = ["email", "name", "type", "disabled", "groups", "id"]


@click.group(cls=_AdminGroup)
def user() -> None:
    """Manage users, admins and service accounts."""


@user.command("add")
@click.argument("email")
@click.option("--name", help="Display name.")
@click.option("--admin", is_flag=True, help="Make an admin (may manage the portal).")
@click.option("--service-account", is_flag=True,
              help="Make a service account (signs in with a token from `fz token create client`).")
@json_option
@click.pass_obj
def user_add(app: AppContext, email: str, name: str | None, admin: bool, service_account: bool) -> None:
    """Add a user identified by EMAIL.

    \b
    fz user add alice@example.com --name "Alice Liddell"
    fz user add ops@example.com --admin
    fz user add ci@example.com --service-account
    """
    if admin and service_account:
        raise click.UsageError("--admin and --service-account exclude each other")
    body: dict[str, Any] = {"email": email}
    if name is not None:
        body["name"] = name
    if admin:
        body["type"] = "admin"
    elif service_account:
        body["type"] = "service_account"
    u = _data(_client(app).post("/users", json=body))
    _show(app, u, _user_row, f"created {escape(str(u.get('type')))} {escape(str(u.get('email')))}")


@user.command("list")
@click.option("--email", help="Only the user with this email.")
@limit_option()
@json_option
@click.pass_obj
def user_list(app: AppContext, email: str | None, limit: int | None) -> None:
    """List users (all pages)."""
    items = list(_client(app).iterate("/users", {"email": email}, limit=limit))
    _list(app, items, _user_row, USER_COLUMNS)


@user.command("show")
@click.argument("user_ref", metavar="EMAIL|ID")
@json_option
@click.pass_obj
def user_show(app: AppContext, user_ref: str) -> None:
    """Show one user with its groups."""
    _show(app, _data(_client(app).get(f"/users/{_ref(user_ref)}")), _user_row)


def _set_disabled(app: AppContext, user_ref: str, disabled: bool) -> None:
    u = _data(_client(app).patch(f"/users/{_ref(user_ref)}", json={"disabled": disabled}))
    _done(app, f"{'disabled' if disabled else 'enabled'} {u.get('email', user_ref)}", u)


@user.command("disable")
@click.argument("user_ref", metavar="EMAIL|ID")
@json_option
@click.pass_obj
def user_disable(app: AppContext, user_ref: str) -> None:
    """Disable a user: no new sign-ins or connections until enabled again."""
    _set_disabled(app, user_ref, True)


@user.command("enable")
@click.argument("user_ref", metavar="EMAIL|ID")
@json_option
@click.pass_obj
def user_enable(app: AppContext, user_ref: str) -> None:
    """Enable a disabled user."""
    _set_disabled(app, user_ref, False)


@user.command("remove")
@click.argument("user_ref", metavar="EMAIL|ID")
@json_option
@click.pass_obj
def user_remove(app: AppContext, user_ref: str) -> None:
    """Remove a user, its group memberships and its tokens."""
    _client(app).delete(f"/users/{_ref(user_ref)}")
    _done(app, f"removed user {user_ref}")


# ---------------------------------------------------------------------------------------------
# fz group

@click.group(cls=_AdminGroup)
def group() -> None:
    """Manage groups and their members (policies grant groups access to resources)."""


@group.command("add")
@click.argument("name")
@json_option
@click.pass_obj
def group_add(app: AppContext, name: str) -> None:
    """Add a group called NAME."""
    g = _data(_client(app).post("/groups", json={"name": name}))
    _show(app, g, _group_row, f"created group {escape(str(g.get('name')))}")


@group.command("list")
@limit_option()
@json_option
@click.pass_obj
def group_list(app: AppContext, limit: int | None) -> None:
    """List groups with their member counts."""
    items = list(_client(app).iterate("/groups", limit=limit))
    _list(app, items, _group_row, ["name", "managed", "members", "id"])


@group.command("show")
@click.argument("group_ref", metavar="GROUP")
@json_option
@click.pass_obj
def group_show(app: AppContext, group_ref: str) -> None:
    """Show one group (by name or id)."""
    _show(app, _data(_client(app).get(f"/groups/{_ref(group_ref)}")), _group_row)


@group.command("rename")
@click.argument("group_ref", metavar="GROUP")
@click.argument("new_name", metavar="NEW_NAME")
@json_option
@click.pass_obj
def group_rename(app: AppContext, group_ref: str, new_name: str) -> None:
    """Rename GROUP to NEW_NAME."""
    g = _data(_client(app).patch(f"/groups/{_ref(group_ref)}", json={"name": new_name}))
    _done(app, f"renamed group {group_ref} to {g.get('name', new_name)}", g)


@group.command("remove")
@click.argument("group_ref", metavar="GROUP")
@json_option
@click.pass_obj
def group_remove(app: AppContext, group_ref: str) -> None:
    """Remove a group with its memberships and the policies that grant it access."""
    _client(app).delete(f"/groups/{_ref(group_ref)}")
    _done(app, f"removed group {group_ref}")


@group.command("members")
@click.argument("group_ref", metavar="GROUP")
@limit_option()
@json_option
@click.pass_obj
def group_members(app: AppContext, group_ref: str, limit: int | None) -> None:
    """List the members of GROUP."""
    items = list(_client(app).iterate(f"/groups/{_ref(group_ref)}/members", limit=limit))
    _list(app, items, _user_row, ["email", "name", "type", "disabled", "id"])


@group.command("add-member")
@click.argument("group_ref", metavar="GROUP")
@click.argument("user_ref", metavar="EMAIL")
@json_option
@click.pass_obj
def group_add_member(app: AppContext, group_ref: str, user_ref: str) -> None:
    """Add the user EMAIL to GROUP."""
    answer = _data(_client(app).post(f"/groups/{_ref(group_ref)}/members", json={"user": user_ref}))
    _done(app, f"added {user_ref} to {group_ref}", answer)


@group.command("remove-member")
@click.argument("group_ref", metavar="GROUP")
@click.argument("user_ref", metavar="EMAIL")
@json_option
@click.pass_obj
def group_remove_member(app: AppContext, group_ref: str, user_ref: str) -> None:
    """Remove the user EMAIL from GROUP."""
    _client(app).delete(f"/groups/{_ref(group_ref)}/members/{_ref(user_ref)}")
    _done(app, f"removed {user_ref} from {group_ref}")


# ---------------------------------------------------------------------------------------------
# fz account

def _account_row(a: dict[str, Any]) -> dict[str, Any]:
    return {"name": a.get("name"), "slug": a.get("slug"), "search_domain": a.get("search_domain") or "-",
            "upstream_dns": ", ".join(a.get("upstream_dns") or []) or "- (each machine's own resolvers)",
            "id": a.get("id")}


@click.group(cls=_AdminGroup)
def account() -> None:
    """Show or change the account's settings for every client (search domain, DNS resolvers)."""


@account.command("show")
@json_option
@click.pass_obj
def account_show(app: AppContext) -> None:
    """Show the account: name, sign-in slug, search domain and upstream resolvers."""
    _show(app, _data(_client(app).get("/account")), _account_row)


@account.command("set")
@click.option("--search-domain", metavar="DOMAIN",
              help="Domain clients append to short names (`gitlab` -> `gitlab.DOMAIN`); '' removes it.")
@click.option("--upstream-dns", "upstream", metavar="IP[:PORT]", multiple=True,
              help="Resolver for names that are no resource, instead of each machine's own; repeatable, "
                   "replaces the list.")
@click.option("--system-dns", is_flag=True, help="Forget the upstream resolvers: clients use their machine's own.")
@json_option
@click.pass_obj
def account_set(app: AppContext, search_domain: str | None, upstream: tuple[str, ...], system_dns: bool) -> None:
    """Change client settings; connected clients apply them at once.

    \b
    fz account set --search-domain corp.example.com
    fz account set --upstream-dns 192.0.2.53 --upstream-dns [2001:db8::53]:5353
    fz account set --system-dns --search-domain ''
    """
    if upstream and system_dns:
        raise click.UsageError("--upstream-dns and --system-dns exclude each other")
    body: dict[str, Any] = {}
    if search_domain is not None:
        body["search_domain"] = search_domain or None
    if upstream or system_dns:
        body["upstream_dns"] = list(upstream)
    if not body:
        raise click.UsageError("nothing to change: give --search-domain, --upstream-dns or --system-dns")
    _show(app, _data(_client(app).patch("/account", json=body)), _account_row, "updated the account")


# ---------------------------------------------------------------------------------------------
# fz site

@click.group(cls=_AdminGroup)
def site() -> None:
    """Manage sites (a network where gateways and the resources they reach live)."""


@site.command("add")
@click.argument("name")
@json_option
@click.pass_obj
def site_add(app: AppContext, name: str) -> None:
    """Add a site called NAME; then `fz token create gateway --site NAME` for its gateways."""
    s = _data(_client(app).post("/sites", json={"name": name}))
    _show(app, s, _site_row, f"created site {escape(str(s.get('name')))}")


@site.command("list")
@limit_option()
@json_option
@click.pass_obj
def site_list(app: AppContext, limit: int | None) -> None:
    """List sites with their resource and gateway counts."""
    items = list(_client(app).iterate("/sites", limit=limit))
    _list(app, items, _site_row, ["name", "resources", "gateways", "id"])


@site.command("show")
@click.argument("site_ref", metavar="SITE")
@json_option
@click.pass_obj
def site_show(app: AppContext, site_ref: str) -> None:
    """Show one site (by name or id)."""
    _show(app, _data(_client(app).get(f"/sites/{_ref(site_ref)}")), _site_row)


@site.command("rename")
@click.argument("site_ref", metavar="SITE")
@click.argument("new_name", metavar="NEW_NAME")
@json_option
@click.pass_obj
def site_rename(app: AppContext, site_ref: str, new_name: str) -> None:
    """Rename SITE to NEW_NAME."""
    st = _data(_client(app).patch(f"/sites/{_ref(site_ref)}", json={"name": new_name}))
    _done(app, f"renamed site {site_ref} to {st.get('name', new_name)}", st)


@site.command("remove")
@click.argument("site_ref", metavar="SITE")
@json_option
@click.pass_obj
def site_remove(app: AppContext, site_ref: str) -> None:
    """Remove a site (refused while resources belong to it)."""
    _client(app).delete(f"/sites/{_ref(site_ref)}")
    _done(app, f"removed site {site_ref}")


# ---------------------------------------------------------------------------------------------
# fz resource

RESOURCE_TYPES = click.Choice(["ip", "cidr", "dns", "internet"])
FILTER_HELP = ("Allow only this traffic; repeatable: tcp/80, udp/1000-2000, tcp/80,443, icmp, "
               "tcp (every port). No filter: all traffic.")


@click.group(cls=_AdminGroup)
def resource() -> None:
    """Manage resources: an IP, a CIDR range, a DNS name pattern or the internet."""


@resource.command("add")
@click.argument("name")
@click.option("--site", "site_ref", required=True, metavar="SITE", help="Site whose gateways reach it.")
@click.option("--address", metavar="ADDR",
              help="IP, CIDR, or DNS name (patterns: *.corp.example, **.corp.example, host?.example).")
@click.option("--type", "rtype", type=RESOURCE_TYPES, help="Resource type (default: inferred from the address).")
@click.option("--description", help="Address description shown in clients (e.g. a URL).")
@click.option("--filter", "filters", multiple=True, metavar="PROTO[/PORTS]", callback=_filters_callback,
              help=FILTER_HELP)
@json_option
@click.pass_obj
def resource_add(app: AppContext, name: str, site_ref: str, address: str | None, rtype: str | None,
                 description: str | None, filters: list[dict[str, Any]] | None) -> None:
    """Add a resource called NAME in SITE.

    \b
    fz resource add db --site hq --address 10.0.0.5 --filter tcp/5432
    fz resource add intranet --site hq --address '**.corp.example' --filter tcp/443
    """
    body: dict[str, Any] = {"name": name, "site": site_ref}
    if address is not None:
        body["address"] = address
    if rtype is not None:
        body["type"] = rtype
    if description is not None:
        body["address_description"] = description
    if filters is not None:
        body["filters"] = filters
    r = _data(_client(app).post("/resources", json=body))
    _show(app, r, _resource_row, f"created resource {escape(str(r.get('name')))}")


@resource.command("list")
@click.option("--site", "site_ref", metavar="SITE", help="Only resources of this site.")
@limit_option()
@json_option
@click.pass_obj
def resource_list(app: AppContext, site_ref: str | None, limit: int | None) -> None:
    """List resources."""
    items = list(_client(app).iterate("/resources", {"site": site_ref}, limit=limit))
    _list(app, items, _resource_row, ["name", "type", "address", "site", "filters", "id"])


@resource.command("show")
@click.argument("resource_ref", metavar="RESOURCE")
@json_option
@click.pass_obj
def resource_show(app: AppContext, resource_ref: str) -> None:
    """Show one resource (by name or id)."""
    _show(app, _data(_client(app).get(f"/resources/{_ref(resource_ref)}")), _resource_row)


@resource.command("update")
@click.argument("resource_ref", metavar="RESOURCE")
@click.option("--name", help="New name.")
@click.option("--site", "site_ref", metavar="SITE", help="Move to another site.")
@click.option("--address", metavar="ADDR", help="New address.")
@click.option("--type", "rtype", type=RESOURCE_TYPES, help="New type.")
@click.option("--description", help="New address description (empty string clears it).")
@click.option("--filter", "filters", multiple=True, metavar="PROTO[/PORTS]", callback=_filters_callback,
              help="Replace the filters; repeatable (see `fz resource add --help`).")
@click.option("--no-filters", is_flag=True, help="Remove every filter: allow all traffic.")
@json_option
@click.pass_obj
def resource_update(app: AppContext, resource_ref: str, name: str | None, site_ref: str | None,
                    address: str | None, rtype: str | None, description: str | None,
                    filters: list[dict[str, Any]] | None, no_filters: bool) -> None:
    """Change fields of a resource; fields not given stay as they are."""
    if filters is not None and no_filters:
        raise click.UsageError("--filter and --no-filters exclude each other")
    body: dict[str, Any] = {}
    for key, value in (("name", name), ("site", site_ref), ("address", address), ("type", rtype)):
        if value is not None:
            body[key] = value
    if description is not None:
        body["address_description"] = description or None
    if filters is not None:
        body["filters"] = filters
    if no_filters:
        body["filters"] = []
    if not body:
        raise click.UsageError("nothing to update: give at least one option")
    r = _data(_client(app).patch(f"/resources/{_ref(resource_ref)}", json=body))
    _show(app, r, _resource_row, f"updated resource {escape(str(r.get('name')))}")


@resource.command("remove")
@click.argument("resource_ref", metavar="RESOURCE")
@json_option
@click.pass_obj
def resource_remove(app: AppContext, resource_ref: str) -> None:
    """Remove a resource and the policies that grant it."""
    _client(app).delete(f"/resources/{_ref(resource_ref)}")
    _done(app, f"removed resource {resource_ref}")


# ---------------------------------------------------------------------------------------------
# fz policy

CONDITION_HELP = """Condition that must hold; repeatable (all must hold).
Syntax: PROPERTY OPERATOR VALUES, e.g.
'remote_ip in 10.0.0.0/8,192.0.2.7', 'remote_ip not_in 198.51.100.0/24',
'provider_id in ID[,ID]', 'provider_id not_in ID',
'time in M-F/09:00-17:00/Europe/Berlin;S,U/10:00-12:00/UTC' (days M T W R F S U, runs like
MTWRF, ranges like M-F, 'true' = the whole day; the time zone is required),
'client_verified'. The JSON names work too (remote_ip is_in_cidr 10.0.0.0/8)."""


def _conditions_callback(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> Any:
    if not value:
        return None
    out = []
    for text in value:
        try:
            out.append(_parse_condition(text))
        except ValueError as e:
            raise click.BadParameter(f"{text!r}: {e}") from None
    return out


@click.group(cls=_AdminGroup)
def policy() -> None:
    """Manage policies (a group may reach a resource) and explain access decisions."""


@policy.command("add")
@click.option("--group", "group_ref", required=True, metavar="GROUP", help="Group granted access.")
@click.option("--resource", "resource_ref", required=True, metavar="RESOURCE", help="Resource it may reach.")
@click.option("--description", help="Why this policy exists.")
@click.option("--condition", "conditions", multiple=True, metavar="COND", callback=_conditions_callback,
              help=CONDITION_HELP)
@click.option("--disabled", is_flag=True, help="Create it disabled.")
@json_option
@click.pass_obj
def policy_add(app: AppContext, group_ref: str, resource_ref: str, description: str | None,
               conditions: list[dict[str, Any]] | None, disabled: bool) -> None:
    """Allow the members of GROUP to reach RESOURCE (access is denied by default).

    \b
    fz policy add --group eng --resource db
    fz policy add --group eng --resource db --condition 'remote_ip is_in_cidr 192.0.2.0/24'
    """
    body: dict[str, Any] = {"group": group_ref, "resource": resource_ref}
    if description is not None:
        body["description"] = description
    if conditions:
        body["conditions"] = conditions
    if disabled:
        body["disabled"] = True
    p = _data(_client(app).post("/policies", json=body))
    _show(app, p, _policy_row, f"created policy {escape(str(p.get('id')))}")


@policy.command("list")
@click.option("--group", "group_ref", metavar="GROUP", help="Only policies of this group.")
@click.option("--resource", "resource_ref", metavar="RESOURCE", help="Only policies for this resource.")
@limit_option()
@json_option
@click.pass_obj
def policy_list(app: AppContext, group_ref: str | None, resource_ref: str | None, limit: int | None) -> None:
    """List policies."""
    items = list(_client(app).iterate("/policies", {"group": group_ref, "resource": resource_ref},
                                      limit=limit))
    _list(app, items, _policy_row, ["id", "group", "resource", "conditions", "disabled", "description"])


@policy.command("show")
@click.argument("policy_id", metavar="ID")
@json_option
@click.pass_obj
def policy_show(app: AppContext, policy_id: str) -> None:
    """Show one policy."""
    _show(app, _data(_client(app).get(f"/policies/{_ref(policy_id)}")), _policy_row)


@policy.command("update")
@click.argument("policy_id", metavar="ID")
@click.option("--description", help="New description.")
@click.option("--condition", "conditions", multiple=True, metavar="COND", callback=_conditions_callback,
              help="Replace the conditions; repeatable (syntax: `fz policy add --help`).")
@click.option("--no-conditions", is_flag=True, help="Remove every condition.")
@json_option
@click.pass_obj
def policy_update(app: AppContext, policy_id: str, description: str | None,
                  conditions: list[dict[str, Any]] | None, no_conditions: bool) -> None:
    """Change the description or the conditions of a policy (its group and resource are fixed)."""
    if conditions is not None and no_conditions:
        raise click.UsageError("--condition and --no-conditions exclude each other")
    body: dict[str, Any] = {}
    if description is not None:
        body["description"] = description
    if conditions is not None:
        body["conditions"] = conditions
    if no_conditions:
        body["conditions"] = []
    if not body:
        raise click.UsageError("nothing to update: give at least one option")
    p = _data(_client(app).patch(f"/policies/{_ref(policy_id)}", json=body))
    _show(app, p, _policy_row, f"updated policy {escape(str(p.get('id')))}")


def _set_policy_disabled(app: AppContext, policy_id: str, disabled: bool) -> None:
    p = _data(_client(app).patch(f"/policies/{_ref(policy_id)}", json={"disabled": disabled}))
    _done(app, f"{'disabled' if disabled else 'enabled'} policy {p.get('id', policy_id)}", p)


@policy.command("disable")
@click.argument("policy_id", metavar="ID")
@json_option
@click.pass_obj
def policy_disable(app: AppContext, policy_id: str) -> None:
    """Disable a policy without removing it; connections it allowed are cut."""
    _set_policy_disabled(app, policy_id, True)


@policy.command("enable")
@click.argument("policy_id", metavar="ID")
@json_option
@click.pass_obj
def policy_enable(app: AppContext, policy_id: str) -> None:
    """Enable a disabled policy."""
    _set_policy_disabled(app, policy_id, False)


@policy.command("remove")
@click.argument("policy_id", metavar="ID")
@json_option
@click.pass_obj
def policy_remove(app: AppContext, policy_id: str) -> None:
    """Remove a policy; connections it allowed are cut."""
    _client(app).delete(f"/policies/{_ref(policy_id)}")
    _done(app, f"removed policy {policy_id}")


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise ValueError(f"invalid IP address {text!r}") from None


@policy.command("explain")
@click.option("--user", "user_ref", required=True, metavar="EMAIL", help="Who connects.")
@click.option("--resource", "resource_ref", required=True, metavar="RESOURCE", help="What they reach.")
@click.option("--at", metavar="TIME", callback=_click_parse(parse_at),
              help="When (ISO 8601; UTC unless an offset is given; default: now).")
@click.option("--from-ip", metavar="IP", callback=_click_parse(_ip), help="The client's public IP.")
@click.option("--provider", metavar="NAME", help="Sign-in provider the user used.")
@click.option("--verified/--unverified", "verified", default=None,
              help="Whether the client device is verified.")
@json_option
@click.pass_obj
@click.pass_context
def policy_explain(ctx: click.Context, app: AppContext, user_ref: str, resource_ref: str, at: str | None,
                   from_ip: str | None, provider: str | None, verified: bool | None) -> None:
    """Would USER be allowed to reach RESOURCE, and why (exit 0 allow, 3 deny).

    Evaluates the policies as the portal would for a connection request, without recording
    it. On allow it names the matching policy and when the access expires; on deny it lists
    every candidate policy (those of the user's groups for this resource) with the conditions
    that failed.

    \b
    fz policy explain --user alice@example.com --resource db --from-ip 192.0.2.7
    fz policy explain --user alice@example.com --resource db --at 2026-11-28T22:00+01:00
    """
    body: dict[str, Any] = {"user": user_ref, "resource": resource_ref}
    for key, value in (("at", at), ("remote_ip", from_ip), ("provider", provider),
                       ("client_verified", verified)):
        if value is not None:
            body[key] = value
    api = _client(app)
    d = _data(api.post("/policies/explain", json=body)) or {}
    allowed = bool(d.get("allowed"))
    if app.json:
        app.emit(d)
    else:
        _print_explanation(app, api, user_ref, resource_ref, d)
    ctx.exit(0 if allowed else EXIT_DENY)


def _print_explanation(app: AppContext, api: ApiClient, user_ref: str, resource_ref: str,
                       d: dict[str, Any]) -> None:
    who, what = escape(user_ref), escape(resource_ref)
    c = app.console
    if d.get("allowed"):
        line = f"[bold green]allow[/]: {who} may reach {what}"
        if d.get("policy_id"):
            line += f" through policy {escape(str(d['policy_id']))}"
            match = next((x for x in d.get("candidates") or []
                          if isinstance(x, dict) and x.get("policy_id") == d["policy_id"]), None)
            if match and match.get("group") is not None:
                line += f" (group {escape(str(_name(match['group'])))})"
        if d.get("expires_at"):
            line += f", until {escape(str(d['expires_at']))}"
        c.print(line, highlight=False)
    else:
        reason = d.get("reason") or "no policy allows it"
        c.print(f"[bold red]deny[/]: {who} may not reach {what}: {escape(str(reason))}", highlight=False)
        if d.get("violated_properties"):
            violated = ", ".join(str(v) for v in d["violated_properties"])
            c.print(f"violated: {escape(violated)}", highlight=False)
    candidates = [x for x in d.get("candidates") or [] if isinstance(x, dict)]
    if not candidates:
        return
    rows = []
    for x in candidates:
        if x.get("policy_id") == d.get("policy_id") and d.get("allowed"):
            verdict = "matched"
        elif x.get("disabled"):
            verdict = "disabled"
        elif x.get("violated_properties"):
            verdict = "failed: " + _failed_conditions(api, x)
        else:
            verdict = "holds"
        rows.append({"policy": x.get("policy_id"), "group": _name(x.get("group")),
                     "description": x.get("description"), "verdict": verdict})
    c.print("candidate policies:", highlight=False)
    app.table(rows, ["policy", "group", "verdict", "description"])


def _failed_conditions(api: ApiClient, candidate: dict[str, Any]) -> str:
    """The candidate's conditions on the violated properties, in --condition syntax."""
    from firezone.portal.api_client import ApiError

    violated = [str(v) for v in candidate["violated_properties"]]
    try:
        pol = _data(api.get(f"/policies/{_ref(str(candidate.get('policy_id')))}")) or {}
    except ApiError:
        return ", ".join(violated)
    texts: list[str] = []
    for prop in violated:
        conds = [cd for cd in pol.get("conditions") or []
                 if isinstance(cd, dict) and _same_property(str(cd.get("property")), prop)]
        if conds:
            texts.extend(condition_text(cd) for cd in conds)
        else:
            texts.append(prop)
    return " & ".join(texts)


def _same_property(a: str, b: str) -> bool:
    aliases = {"auth_provider_id": "provider_id"}
    return aliases.get(a, a) == aliases.get(b, b)


# ---------------------------------------------------------------------------------------------
# fz token

TOKEN_KINDS = click.Choice(["gateway", "relay", "client", "api"])


@click.group(cls=_AdminGroup)
def token() -> None:
    """Create, list and revoke tokens for gateways, relays, headless clients and the API."""


@token.command("create")
@click.argument("kind", type=TOKEN_KINDS)
@click.option("--site", "site_ref", metavar="SITE", help="Site of the gateway (gateway tokens).")
@click.option("--user", "user_ref", metavar="EMAIL",
              help="User or service account the token acts as (client and api tokens).")
@click.option("--expires", metavar="DURATION", callback=_click_parse(parse_duration),
              help="Lifetime; " + DURATION_HELP + " Required for client tokens.")
@click.option("--name", help="A label to recognise the token by.")
@json_option
@click.pass_obj
def token_create(app: AppContext, kind: str, site_ref: str | None, user_ref: str | None,
                 expires: int | None, name: str | None) -> None:
    """Create a token of KIND (gateway, relay, client, api); its secret is shown only once.

    \b
    fz token create gateway --site hq
    fz token create relay
    fz token create client --user ci@example.com --expires 30d
    fz token create api
    With --json the token object is printed with an added "secret" field.
    """
    if kind == "gateway" and not site_ref:
        raise click.UsageError("gateway tokens need --site SITE")
    if kind != "gateway" and site_ref:
        raise click.UsageError(f"--site applies only to gateway tokens, not {kind}")
    if kind == "client" and (not user_ref or expires is None):
        raise click.UsageError("client tokens need --user EMAIL and --expires DURATION")
    if kind in ("gateway", "relay") and user_ref:
        raise click.UsageError(f"--user does not apply to {kind} tokens")
    body: dict[str, Any] = {"type": kind}
    for key, value in (("name", name), ("site", site_ref), ("user", user_ref), ("expires_in", expires)):
        if value is not None:
            body[key] = value
    answer = _client(app).post("/tokens", json=body) or {}
    t = _data(answer) or {}
    secret = answer.get("secret") if isinstance(answer, dict) else None
    if app.json:
        app.emit({**t, "secret": secret})
        return
    what = f"{kind} token {t.get('id')}"
    if t.get("site"):
        what += f" for site {_name(t['site'])}"
    if t.get("actor"):
        what += f" for {_name(t['actor'], 'email')}"
    what += f", expires {t['expires_at']}" if t.get("expires_at") else ", never expires"
    click.echo(f"created {what}", err=True)
    click.echo("secret (shown only now; store it safely):", err=True)
    click.echo(secret or "")


@token.command("list")
@click.option("--type", "kind", type=TOKEN_KINDS, help="Only tokens of this kind.")
@limit_option()
@json_option
@click.pass_obj
def token_list(app: AppContext, kind: str | None, limit: int | None) -> None:
    """List tokens (never their secrets)."""
    items = list(_client(app).iterate("/tokens", {"type": kind}, limit=limit))
    _list(app, items, _token_row, ["id", "type", "name", "user", "site", "expires", "revoked", "last used"])


@token.command("show")
@click.argument("token_id", metavar="ID")
@json_option
@click.pass_obj
def token_show(app: AppContext, token_id: str) -> None:
    """Show one token (never its secret)."""
    _show(app, _data(_client(app).get(f"/tokens/{_ref(token_id)}")), _token_row)


@token.command("revoke")
@click.argument("token_id", metavar="ID")
@json_option
@click.pass_obj
def token_revoke(app: AppContext, token_id: str) -> None:
    """Revoke a token; whatever uses it is disconnected."""
    _client(app).delete(f"/tokens/{_ref(token_id)}")
    _done(app, f"revoked token {token_id}")


# ---------------------------------------------------------------------------------------------
# fz audit

@click.group(cls=_AdminGroup)
def audit() -> None:
    """Inspect the portal's record of access decisions."""


@audit.command("list")
@click.option("--result", type=click.Choice(["allow", "deny"]), help="Only allowed or denied requests.")
@click.option("--user", "user_ref", metavar="EMAIL", help="Only this user.")
@click.option("--resource", "resource_ref", metavar="RESOURCE", help="Only this resource.")
@limit_option(100)
@json_option
@click.pass_obj
def audit_list(app: AppContext, result: str | None, user_ref: str | None, resource_ref: str | None,
               limit: int) -> None:
    """List policy decisions, newest first."""
    params = {"result": result, "user": user_ref, "resource": resource_ref}
    items = list(_client(app).iterate("/audit", params, limit=limit))
    _list(app, items, _decision_row, ["at", "result", "user", "resource", "reason", "violated", "remote ip"])


# ---------------------------------------------------------------------------------------------
# fz device / fz gateway: who is online

DEVICE_COLUMNS = ["name", "type", "online", "ipv4", "last_seen_at", "last_seen_remote_ip", "version", "id"]


def _device_row(d: dict[str, Any]) -> dict[str, Any]:
    return {k: d.get(k) for k in DEVICE_COLUMNS}


def _list_devices(app: AppContext, kind: str | None, online_only: bool, limit: int | None) -> None:
    items = list(_client(app).iterate("/devices", {"type": kind}, limit=limit))
    if online_only:
        items = [d for d in items if d.get("online")]
    _list(app, items, _device_row, DEVICE_COLUMNS)


@click.group(cls=_AdminGroup)
def device() -> None:
    """Clients and gateways known to the portal, and who is online."""


@device.command("list")
@click.option("--type", "kind", type=click.Choice(["client", "gateway"]), help="Only clients or only gateways.")
@click.option("--online", "online_only", is_flag=True, help="Only devices connected right now.")
@limit_option()
@json_option
@click.pass_obj
def device_list(app: AppContext, kind: str | None, online_only: bool, limit: int | None) -> None:
    """List devices with their tunnel address, last seen time, remote address and version."""
    _list_devices(app, kind, online_only, limit)


@click.group(cls=_AdminGroup)
def gateway() -> None:
    """Gateways: the processes next to private resources."""


@gateway.command("list")
@click.option("--online", "online_only", is_flag=True, help="Only gateways connected right now.")
@limit_option()
@json_option
@click.pass_obj
def gateway_list(app: AppContext, online_only: bool, limit: int | None) -> None:
    """List gateways with presence, last seen time, remote address and version."""
    _list_devices(app, "gateway", online_only, limit)


RELAY_COLUMNS = ["name", "ipv4", "ipv6", "port", "remote_ip", "version", "online_since", "id"]


def list_relays(app: AppContext) -> None:
    """Relays connected to the portal now (used by `fz relay list`)."""
    from firezone.portal.api_client import ApiError

    try:
        items = _data(_client(app).get("/relays"))
    except ApiError as e:
        raise _api_error(e) from None
    _list(app, items, lambda r: {k: r.get(k) for k in RELAY_COLUMNS}, RELAY_COLUMNS)
from firezone.cli import gateway_up as _gateway_up  # noqa: E402,F401
