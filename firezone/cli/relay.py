"""``fz relay``: run a STUN/TURN relay and mint credentials for it."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import socket
import time
from pathlib import Path
from typing import Any

import click

from firezone.cli.output import AppContext, CliError

DEFAULT_TTL = 24 * 3600


class HostPort(click.ParamType):  # type: ignore[type-arg]
    """``HOST:PORT``, ``[V6]:PORT``; HOST must be an IP address literal."""

    name = "HOST:PORT"

    def __init__(self, default_port: int | None = None) -> None:
        self.default_port = default_port

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        text = str(value).strip()
        host, port_s = text, None
        if text.startswith("["):
            end = text.find("]")
            if end < 0:
                self.fail(f"{text!r}: missing ']'", param, ctx)
            host, rest = text[1:end], text[end + 1:]
            if rest:
                if not rest.startswith(":"):
                    self.fail(f"{text!r}: expected [ADDR]:PORT", param, ctx)
                port_s = rest[1:]
        elif text.count(":") == 1:
            host, port_s = text.split(":")
        elif text.count(":") > 1:
            self.fail(f"{text!r}: write an IPv6 address with a port as [ADDR]:PORT", param, ctx)
        if port_s is None:
            if self.default_port is None:
                self.fail(f"{text!r}: expected HOST:PORT", param, ctx)
            port = self.default_port
        else:
            try:
                port = int(port_s)
            except ValueError:
                self.fail(f"{text!r}: port {port_s!r} is not a number", param, ctx)
            if not 0 <= port <= 65535:
                self.fail(f"{text!r}: port must be 0-65535", param, ctx)
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            self.fail(f"{text!r}: {host!r} is not an IP address", param, ctx)
        return host, port


class PortRange(click.ParamType):  # type: ignore[type-arg]
    name = "LOW-HIGH"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        lo_s, sep, hi_s = str(value).partition("-")
        try:
            lo, hi = int(lo_s), int(hi_s)
        except ValueError:
            self.fail(f"{value!r}: expected LOW-HIGH, e.g. 49152-65535", param, ctx)
        if not sep or not 1024 <= lo <= hi <= 65535:
            self.fail(f"{value!r}: need 1024 <= LOW <= HIGH <= 65535", param, ctx)
        return lo, hi


def _ip(version: int) -> Any:
    def check(_ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            addr = ipaddress.ip_address(value)
        except ValueError:
            raise click.BadParameter(f"{value!r} is not an IP address") from None
        if addr.version != version:
            raise click.BadParameter(f"{value!r} is not an IPv{version} address")
        return str(addr)
    return check


@click.group()
def relay() -> None:
    """Run a STUN/TURN relay (RFC 8489 / RFC 8656) and mint credentials for it."""


@relay.command("run")
@click.option("--listen", "listen", type=HostPort(3478), multiple=True, metavar="HOST:PORT",
              help="UDP address for STUN/TURN; at most one IPv4 and one IPv6. "
                   "Default: 0.0.0.0:3478 and [::]:3478.")
@click.option("--relay-ports", type=PortRange(), default="49152-65535", show_default=True,
              help="UDP port range for relayed (allocation) addresses.")
@click.option("--public-ip4", callback=_ip(4), metavar="ADDR",
              help="IPv4 address advertised in relayed addresses (default: the listen address, "
                   "else the default route's).")
@click.option("--public-ip6", callback=_ip(6), metavar="ADDR", help="Same for IPv6.")
@click.option("--health-listen", type=HostPort(), metavar="HOST:PORT",
              help="Serve /healthz, /readyz and Prometheus /metrics over HTTP here (off by default).")
@click.option("--secret-file", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Relay secret shared with whoever mints credentials; created (0600) if missing.")
@click.option("--token", metavar="TOKEN", envvar="FIREZONE_TOKEN",
              help="Relay token for portal mode (with the global --portal URL).")
@click.option("--allow-loopback-peers", is_flag=True,
              help="Permit peers on loopback addresses (tests on one host only).")
@click.option("--max-allocations-per-user", type=click.IntRange(min=1), metavar="N",
              help="Allocations one TURN username may hold at once (default: 10).")
@click.option("--workers", type=click.IntRange(min=1, max=64), default=1, show_default=True,
              help="Processes sharing the listening port (SO_REUSEPORT), each with a slice of "
                   "the relayed ports; use up to one per core.")
@click.pass_obj
def run_cmd(app: AppContext, listen: tuple[tuple[str, int], ...], relay_ports: tuple[int, int],
            public_ip4: str | None, public_ip6: str | None, health_listen: tuple[str, int] | None,
            secret_file: Path | None, token: str | None, allow_loopback_peers: bool,
            max_allocations_per_user: int | None, workers: int) -> None:
    """Run the relay until SIGTERM/SIGINT.

    Under a portal (fz --portal URL relay run --token TOKEN, the token from
    `fz token create relay`), the relay draws a random secret, joins the portal with it and
    serves only once the portal accepted it; the portal then hands every client and gateway
    credentials for it. Without a portal, give --secret-file and mint credentials with
    `fz relay credentials --secret-file FILE --public-key KEY`.

    \b
    Examples:
      fz --portal https://portal.example.com relay run --token "$RELAY_TOKEN" \\
          --listen 203.0.113.5:3478 --health-listen 127.0.0.1:8080
      fz relay run --secret-file /var/lib/firezone/relay.secret --listen 203.0.113.5:3478
    """
    from firezone.roles import relay as role

    portal = app.config.get("portal") if app is not None else None
    portal_mode = bool(portal and token)
    if secret_file is None and not portal_mode:
        if token and not portal:
            raise CliError("portal mode needs the portal URL too: fz --portal URL relay run --token TOKEN")
        raise CliError("give --secret-file FILE (a shared relay secret; created if missing), "
                       "or run under a portal: fz --portal URL relay run --token TOKEN")
    if secret_file is not None and portal_mode:
        raise CliError("--secret-file and portal mode exclude each other: under a portal the relay "
                       "draws a new secret at every start and hands it to the portal")
    cfg = role.RelayConfig(relay_ports=relay_ports, public_ip4=public_ip4, public_ip6=public_ip6,
                           health_listen=health_listen, allow_loopback_peers=allow_loopback_peers,
                           max_allocations_per_user=max_allocations_per_user)
    if listen:
        cfg.listen = list(listen)
    try:
        p4, p6, _b4, _b6 = role.resolve_addresses(cfg)
        role.split_ports(relay_ports, workers)
        control: role.Control | None = None
        if portal_mode:
            from firezone.roles.relay_control import PortalControl

            port = next((p for _h, p in cfg.listen), role.DEFAULT_PORT)
            control = PortalControl(str(portal), str(token), ipv4=p4, ipv6=p6, port=port,
                                    name=socket.gethostname())
            secret = role.new_secret()
        else:
            assert secret_file is not None
            secret, created = role.load_or_create_secret(secret_file)
            if created:
                click.echo(f"fz: created a new relay secret in {secret_file}", err=True)
        role.main(cfg, secret, control, workers=workers)
    except role.RelayError as e:
        raise CliError(str(e)) from None


def _check_public_key(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise click.BadParameter("not base64 (expected a WireGuard public key)") from None
    if len(raw) != 32:
        raise click.BadParameter(f"decodes to {len(raw)} bytes, a WireGuard public key has 32")
    return value


@relay.command("credentials")
@click.option("--secret-file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              required=True, metavar="FILE", help="The relay's secret file.")
@click.option("--public-key", required=True, callback=_check_public_key, metavar="KEY",
              help="The peer's WireGuard public key (base64).")
@click.option("--ttl", type=click.IntRange(min=1), default=DEFAULT_TTL, show_default=True,
              metavar="SECONDS", help="How long the credentials stay valid.")
@click.option("--json", "json_flag", is_flag=True, help="Print JSON (same as the global --json).")
@click.pass_obj
def credentials_cmd(app: AppContext, secret_file: Path, public_key: str, ttl: int,
                    json_flag: bool) -> None:
    """Print a TURN username and password for one peer (realm firezone).

    The username is "<expiry_unix>:<salt>"; the password is derived from the relay
    secret, so any process holding the secret file can mint them.
    """
    from firezone.proto.turn import credentials as creds
    from firezone.roles import relay as role

    try:
        secret = role.read_secret_file(secret_file)
    except role.RelayError as e:
        raise CliError(str(e)) from None
    expires = int(time.time()) + ttl
    username, password = creds.make_credentials(secret, public_key, expires)
    data = {"username": username, "password": password, "realm": "firezone",
            "expires_at": expires}
    if json_flag and app is not None:
        app.json = True
    if app is None:
        app = AppContext(json=json_flag)
    app.emit(data, human=f"username {username}\npassword {password}")


@relay.command("list")
@click.pass_obj
def list_cmd(app: AppContext) -> None:
    """List the relays connected to the portal now (address, version, since when)."""
    from firezone.cli.admin import list_relays

    list_relays(app)
