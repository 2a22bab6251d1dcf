"""The ``fz`` command: global options, then one subcommand group per role and admin noun."""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

import click

from firezone import __version__
from firezone import config as config_mod
from firezone.cli.output import AppContext, CliError
from firezone.logs import setup_logging

log = logging.getLogger("firezone.cli")

# Each role's commands live in their own module and are registered here.
SUBCOMMANDS = [
    "firezone.cli.config_cmd:config",
    "firezone.cli.completion:completion",
    "firezone.cli.portal:portal",
    "firezone.cli.wg:wg",
    "firezone.cli.admin:account",
    "firezone.cli.admin:user",
    "firezone.cli.admin:group",
    "firezone.cli.admin:site",
    "firezone.cli.admin:resource",
    "firezone.cli.admin:policy",
    "firezone.cli.admin:token",
    "firezone.cli.admin:audit",
    "firezone.cli.admin:device",
    "firezone.cli.admin:gateway",
    "firezone.cli.relay:relay",
    "firezone.cli.lab:lab",
    "firezone.cli.provider:provider",
    "firezone.cli.client:client",
]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--portal", "portal", metavar="URL", help="Portal URL (default: from config or the stored admin sign-in).")
@click.option("--json", "json_output", is_flag=True, help="Machine-readable JSON output.")
@click.option("-v", "--verbose", count=True, help="More logging: -v debug, -vv trace (per packet).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), metavar="PATH",
              help="Read this TOML config file instead of /etc/firezone/config.toml and the user file.")
@click.version_option(__version__, "--version", prog_name="fz")
@click.pass_context
def cli(ctx: click.Context, portal: str | None, json_output: bool, verbose: int, config_path: Path | None) -> None:
    """fz: zero-trust network access.

    One command runs every role: the portal (control plane), relays (STUN/TURN),
    gateways (next to private resources) and clients (on users' machines), plus
    the admin verbs that manage users, groups, sites, resources and policies.
    """
    warnings: list[str] = []
    try:
        cfg = config_mod.load(config_path, warn=warnings.append)
    except config_mod.ConfigError as e:
        raise CliError(str(e)) from None
    cfg.set_flag("portal", portal)
    fmt = cfg.get("log.format")
    setup_logging(verbose, json_lines=None if fmt == "auto" else fmt == "json")
    for w in warnings:
        log.warning(w)
    ctx.obj = AppContext(config=cfg, json=json_output, verbose=verbose)


def _register() -> None:
    for spec in SUBCOMMANDS:
        mod_name, attr = spec.split(":")
        cli.add_command(getattr(importlib.import_module(mod_name), attr))


_register()


def main(argv: list[str] | None = None) -> None:
    """Entry point: never let a traceback reach the user."""
    try:
        rv = cli.main(args=argv, prog_name="fz", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("fz: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    except Exception as e:  # noqa: BLE001 - the last line of defence for the user
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            log.exception("unexpected error")
        click.echo(f"fz: error: unexpected {type(e).__name__}: {e} (run with -v for details)", err=True)
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)
