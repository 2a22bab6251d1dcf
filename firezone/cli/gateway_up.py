"""``fz gateway up``: run a gateway next to private resources (attached to the admin ``gateway`` group)."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import click

from firezone.cli.admin import gateway
from firezone.cli.output import AppContext, CliError

ID_FILE = Path("/var/lib/firezone/gateway-id")


def read_token(token_file: Path | None) -> str:
    """``FIREZONE_TOKEN``, else ``--token-file``, else /etc/firezone/gateway.token."""
    from firezone.roles.gateway import DEFAULT_TOKEN_FILE

    env = os.environ.get("FIREZONE_TOKEN", "").strip()
    if env:
        return env
    path = token_file or DEFAULT_TOKEN_FILE
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        raise CliError(f"no gateway token: set FIREZONE_TOKEN, pass --token-file or create {path} "
                       "(a token from `fz token create gateway --site SITE`)") from None
    except OSError as e:
        raise CliError(f"cannot read the token file {path}: {e.strerror}") from None
    if not text:
        raise CliError(f"the token file {path} is empty")
    return text


def device_id(explicit: str | None) -> str:
    """``--id`` / ``FIREZONE_ID``, else a UUID kept in /var/lib/firezone/gateway-id."""
    if explicit:
        return explicit
    try:
        text = ID_FILE.read_text().strip()
        if text:
            return text
    except OSError:
        pass
    new = str(uuid.uuid4())
    try:
        ID_FILE.parent.mkdir(parents=True, exist_ok=True)
        ID_FILE.write_text(new + "\n")
    except OSError:
        pass
    return new


@gateway.command("up")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Read the gateway token from FILE (default: FIREZONE_TOKEN, else /etc/firezone/gateway.token).")
@click.option("--id", "external_id", envvar="FIREZONE_ID", metavar="ID",
              help="This gateway's stable identity (default: a UUID kept in /var/lib/firezone/gateway-id).")
@click.option("--name", envvar="FIREZONE_NAME", metavar="NAME", help="Name shown in the portal (default: hostname).")
@click.option("--port", type=click.IntRange(0, 65535), default=52625, show_default=True,
              help="UDP port for WireGuard, STUN and TURN traffic.")
@click.option("--local-ip", "local_ips", multiple=True, metavar="IP",
              help="Interface address to offer as host candidate (repeatable; default: the ones towards the portal).")
@click.option("--no-nft", is_flag=True, help="Do not install the masquerading table (NAT done elsewhere).")
@click.pass_obj
def gateway_up(app: AppContext, token_file: Path | None, external_id: str | None, name: str | None, port: int,
               local_ips: tuple[str, ...], no_nft: bool) -> None:
    """Run a gateway in the foreground until Ctrl-C / SIGTERM.

    The gateway connects to the portal (global --portal or config portal_url) with a gateway
    token, creates the TUN device tun-firezone, accepts WireGuard tunnels from clients the
    portal authorized, enforces each resource's filters (other traffic is answered with ICMP
    "administratively prohibited"), resolves DNS resources itself and masquerades the traffic
    to the resources (nftables table inet firezone, removed on exit). One INFO line per flow.

    \b
    Example:
      FIREZONE_TOKEN=... fz --portal https://portal.example.com gateway up
    """
    from firezone.roles.gateway import GatewayFailure, GatewayRole
    from firezone.runtime import driver

    portal = app.config.get("portal")
    if not portal:
        raise CliError("no portal URL: pass --portal URL (before `gateway`) or set portal_url in the config")
    token = read_token(token_file)
    if os.geteuid() != 0:
        raise CliError("fz gateway up needs root (TUN device, routes, nftables)")
    role = GatewayRole(str(portal), token, external_id=device_id(external_id), name=name or socket.gethostname(),
                       port=port, local_ips=list(local_ips) or None, manage_nft=not no_nft)
    try:
        driver.run(role.run())
    except GatewayFailure as e:
        raise CliError(str(e)) from None
