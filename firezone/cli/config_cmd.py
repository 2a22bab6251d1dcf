"""``fz config``: inspect the effective configuration."""

from __future__ import annotations

import click

from firezone import config as config_mod
from firezone.cli.output import AppContext


@click.group()
def config() -> None:
    """Inspect the configuration (flag > FIREZONE_* env > file > default)."""


@config.command("show")
@click.pass_obj
def show(app: AppContext) -> None:
    """Print every setting with its effective value and where it came from."""
    rows = [{"key": k, "value": v, "source": s, "env": config_mod.KEYS[k].env} for k, v, s in app.config.effective()]
    files = [str(f) for f in app.config.files]
    if app.json:
        app.emit({"files": files, "settings": {r["key"]: r["value"] for r in rows},
                  "sources": {r["key"]: r["source"] for r in rows}})
        return
    app.console.print(f"config files: {', '.join(files) if files else '(none found)'}", highlight=False)
    app.table(rows, ["key", "value", "source", "env"])


@config.command("path")
@click.pass_obj
def path(app: AppContext) -> None:
    """Print the config file locations that are read, in order."""
    paths = [str(config_mod.SYSTEM_CONFIG), str(config_mod.user_config_path())]
    app.emit(paths, human="\n".join(paths))
