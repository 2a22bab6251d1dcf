"""``fz provider``: the account's sign-in providers (email codes, OpenID Connect), over the REST API."""

from __future__ import annotations

from typing import Any

import click

from firezone.cli.admin import (
    DURATION_HELP,
    _AdminGroup,
    _client,
    _data,
    _ref,
    json_option,
    parse_duration,
)
from firezone.cli.output import AppContext, CliError


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _row(p: dict[str, Any]) -> dict[str, Any]:
    return {"name": p.get("name"), "type": p.get("type"), "enabled": not p.get("disabled"),
            "issuer": p.get("issuer"), "client_id": p.get("client_id"),
            "create_users": p.get("create_users") if p.get("type") == "oidc" else None,
            "client_session": _human_s(p.get("client_session_lifetime")), "id": p.get("id")}


def _human_s(v: Any) -> str | None:
    if not isinstance(v, int):
        return None
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if v % n == 0:
            return f"{v // n}{unit}"
    return f"{v}s"


@click.group(cls=_AdminGroup)
def provider() -> None:
    """Sign-in providers: email codes (every account has one) and OpenID Connect."""


@provider.group("add", cls=_AdminGroup)
def add() -> None:
    """Add a sign-in provider."""


@add.command("oidc")
@click.argument("name")
@click.option("--issuer", required=True, metavar="URL", help="The provider's issuer URL (discovery is read from it).")
@click.option("--client-id", required=True, metavar="ID", help="Client id the provider gave the portal.")
@click.option("--client-secret", required=True, metavar="SECRET", envvar="FIREZONE_OIDC_CLIENT_SECRET",
              help="Client secret (or FIREZONE_OIDC_CLIENT_SECRET).")
@click.option("--create-users", is_flag=True,
              help="Create a user at first sign-in when none has the email (default: only existing users).")
@click.option("--client-session", "client_session", metavar="DURATION", callback=_duration,
              help=f"How long a client stays signed in (default 7d; 1h-90d). {DURATION_HELP}")
@click.option("--portal-session", "portal_session", metavar="DURATION", callback=_duration,
              help="How long an admin stays signed in to the portal pages (default 8h; 5m-24h).")
@json_option
@click.pass_obj
def add_oidc(app: AppContext, name: str, issuer: str, client_id: str, client_secret: str, create_users: bool,
             client_session: int | None, portal_session: int | None) -> None:
    """Add an OpenID Connect provider NAME.

    Register the portal at the provider with the redirect URI <portal>/auth/oidc/callback
    (authorization code flow, PKCE S256, scope "openid email profile").
    """
    body: dict[str, Any] = {"type": "oidc", "name": name, "issuer": issuer, "client_id": client_id,
                            "client_secret": client_secret, "create_users": create_users}
    if client_session is not None:
        body["client_session_lifetime"] = client_session
    if portal_session is not None:
        body["portal_session_lifetime"] = portal_session
    p = _data(_client(app).post("/providers", json=body))
    app.emit(p, human=f"Added OIDC provider [bold]{p['name']}[/bold] ({p['issuer']}); "
                      f"redirect URI: <portal>/auth/oidc/callback")


@provider.command("list")
@json_option
@click.pass_obj
def list_cmd(app: AppContext) -> None:
    """List the account's sign-in providers (secrets are never shown)."""
    items = _data(_client(app).get("/providers")) or []
    app.table([_row(p) for p in items],
              ["name", "type", "enabled", "issuer", "client_id", "create_users", "client_session", "id"], data=items)


@provider.command("remove")
@click.argument("name")
@json_option
@click.pass_obj
def remove(app: AppContext, name: str) -> None:
    """Remove the sign-in provider NAME (id or name); its clients' tokens stay valid until they expire."""
    api = _client(app)
    p = _data(api.get(f"/providers/{_ref(name)}"))
    api.delete(f"/providers/{_ref(p['id'])}")
    app.emit({"removed": p["id"], "name": p["name"]}, human=f"Removed provider {p['name']}")


@provider.command("enable")
@click.argument("name")
@json_option
@click.pass_obj
def enable(app: AppContext, name: str) -> None:
    """Let people sign in with provider NAME again."""
    p = _data(_client(app).patch(f"/providers/{_ref(name)}", json={"disabled": False}))
    app.emit(p, human=f"Enabled provider {p['name']}")


@provider.command("disable")
@click.argument("name")
@json_option
@click.pass_obj
def disable(app: AppContext, name: str) -> None:
    """Hide provider NAME from the sign-in page (existing sign-ins stay valid)."""
    p = _data(_client(app).patch(f"/providers/{_ref(name)}", json={"disabled": True}))
    app.emit(p, human=f"Disabled provider {p['name']}")


@provider.command("set")
@click.argument("name")
@click.option("--create-users/--no-create-users", default=None, help="Create unknown users at first sign-in (OIDC).")
@click.option("--client-session", "client_session", metavar="DURATION", callback=_duration,
              help="How long a client stays signed in (1h-90d).")
@click.option("--portal-session", "portal_session", metavar="DURATION", callback=_duration,
              help="How long an admin stays signed in to the portal pages (5m-24h).")
@json_option
@click.pass_obj
def set_cmd(app: AppContext, name: str, create_users: bool | None, client_session: int | None,
            portal_session: int | None) -> None:
    """Change settings of provider NAME."""
    body: dict[str, Any] = {}
    if create_users is not None:
        body["create_users"] = create_users
    if client_session is not None:
        body["client_session_lifetime"] = client_session
    if portal_session is not None:
        body["portal_session_lifetime"] = portal_session
    if not body:
        raise CliError("nothing to change: give --create-users/--no-create-users, --client-session or --portal-session",
                       exit_code=2)
    p = _data(_client(app).patch(f"/providers/{_ref(name)}", json=body))
    app.emit(p, human=f"Updated provider {p['name']}")
