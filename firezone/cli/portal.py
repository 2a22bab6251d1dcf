"""``fz portal``: create and serve the control plane."""

from __future__ import annotations

import errno
from pathlib import Path

import click

from firezone import credentials
from firezone.cli.output import AppContext, CliError
from firezone.portal.errors import PortalError


def _data_dir(app: AppContext, value: Path | None) -> Path:
    return Path(value) if value else Path(app.config.get("portal.data_dir"))


@click.group()
def portal() -> None:
    """Run the portal: the control plane (accounts, policies, sign-in, REST API)."""


@portal.command("init")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the database lives (default: config portal.data_dir).")
@click.option("--account", "slug", required=True, metavar="SLUG",
              help="Account slug, used in sign-in URLs (/<slug>).")
@click.option("--account-name", metavar="NAME", help="Display name of the account (default: the slug).")
@click.option("--admin-email", required=True, metavar="EMAIL", help="Email of the first admin.")
@click.option("--admin-name", metavar="NAME", help="Name of the first admin.")
@click.option("--url", "url", metavar="URL",
              help="URL the admin commands use to reach this portal (default: http://<portal.listen>).")
@click.pass_obj
def init_cmd(app: AppContext, data_dir: Path | None, slug: str, account_name: str | None, admin_email: str,
             admin_name: str | None, url: str | None) -> None:
    """Create a new portal: database, account, admin user, "Everyone" group and an admin API token.

    The token is stored for the invoking OS user (keyring, else a 0600 file) together with the
    portal URL, so `fz user ...`, `fz policy ...` and the other admin commands work right away.
    Refuses to touch a directory that already holds a portal.
    """
    from firezone.roles import portal as role

    d = _data_dir(app, data_dir)
    try:
        res = role.init(d, slug=slug, account_name=account_name, admin_email=admin_email, admin_name=admin_name)
    except role.PortalExists as e:
        raise CliError(str(e)) from None
    except PortalError as e:
        raise CliError(e.detail) from None
    except OSError as e:
        raise CliError(f"cannot create the portal in {d}: {e.strerror}") from None
    portal_url = url or app.config.get("portal") or f"http://{app.config.get('portal.listen')}"
    stored = credentials.store(credentials.ADMIN, {"portal": portal_url.rstrip("/"), "token": res.token})
    data = {"account": {"id": res.account["id"], "slug": res.account["slug"], "name": res.account["name"]},
            "admin": {"id": res.admin["id"], "email": res.admin["email"]}, "database": str(res.db_path),
            "portal": portal_url, "token_stored_in": stored.location}
    where = "the OS keyring" if stored.backend == "keyring" else f"{stored.location} (mode 0600; no keyring available)"
    app.emit(data, human=(
        f"Created account [bold]{res.account['slug']}[/bold] with admin {res.admin['email']}\n"
        f"database: {res.db_path}\n"
        f"admin API token for {portal_url} stored in {where}\n\n"
        f"next: fz portal serve --data-dir {d}\n"
        f"      fz site add HQ && fz resource add web --site HQ --address 10.0.0.5"))


@portal.command("add-account")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the database lives (default: config portal.data_dir).")
@click.option("--account", "slug", required=True, metavar="SLUG", help="Slug of the new account.")
@click.option("--account-name", metavar="NAME", help="Display name of the account (default: the slug).")
@click.option("--admin-email", required=True, metavar="EMAIL", help="Email of the account's first admin.")
@click.pass_obj
def add_account_cmd(app: AppContext, data_dir: Path | None, slug: str, account_name: str | None,
                    admin_email: str) -> None:
    """Add another account to an existing portal and print its admin API token (shown once).

    Run on the portal host; the token is not stored, hand it to that account's admin
    (who uses it as FIREZONE_TOKEN).
    """
    from firezone.roles import portal as role

    d = _data_dir(app, data_dir)
    try:
        res = role.add_account(d, slug=slug, account_name=account_name, admin_email=admin_email)
    except FileNotFoundError:
        raise CliError(f"no portal in {d}: run `fz portal init` first") from None
    except PortalError as e:
        raise CliError(e.detail) from None
    app.emit({"account": {"id": res.account["id"], "slug": res.account["slug"]},
              "admin": {"id": res.admin["id"], "email": res.admin["email"]}, "token": res.token},
             human=f"Created account [bold]{res.account['slug']}[/bold] with admin {res.admin['email']}\n"
                   f"admin API token (shown once): {res.token}")


@portal.command("serve")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the database lives (default: config portal.data_dir).")
@click.option("--listen", metavar="HOST:PORT", help="Address to serve on (default 127.0.0.1:8080).")
@click.option("--smtp-print", is_flag=True,
              help="Write sign-in mails (codes) to the portal log instead of sending them; for local use.")
@click.pass_obj
def serve_cmd(app: AppContext, data_dir: Path | None, listen: str | None, smtp_print: bool) -> None:
    """Serve the portal (REST API, WebSocket control channels, sign-in pages) until SIGTERM/SIGINT."""
    from firezone.roles import portal as role

    d = _data_dir(app, data_dir)
    if not (d / role.DB_NAME).exists():
        raise CliError(f"no portal in {d}: run `fz portal init --data-dir {d} --account SLUG --admin-email EMAIL` first")
    app.config.set_flag("portal.listen", listen)
    try:
        host, port = role.parse_listen(app.config.get("portal.listen"))
    except ValueError as e:
        raise CliError(f"--listen {e}", exit_code=2) from None
    try:
        role.run_serve(d, host, port, max_body_bytes=app.config.get("portal.max_body_bytes"),
                       reevaluate_interval=float(app.config.get("portal.reevaluate_interval")),
                       authorization_timeout=float(app.config.get("portal.authorization_timeout")),
                       signin=role.signin_settings(app.config, smtp_print=smtp_print))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise CliError(f"cannot listen on {host}:{port}: address already in use") from None
        raise CliError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None
