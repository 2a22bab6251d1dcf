"""Rendering for every command: rich for people, JSON for scripts, one-line errors."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import click
from rich.console import Console
from rich.table import Table

from firezone import config as config_mod


class CliError(click.ClickException):
    """A user-facing failure: printed as one line on stderr, exit code 1."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # click declares it on the class

    def show(self, file: Any = None) -> None:
        click.echo(f"fz: error: {self.format_message()}", err=True)


@dataclass
class AppContext:
    """What the global options produce; every command receives it as ``ctx.obj``."""

    config: config_mod.Config = field(default_factory=config_mod.Config)
    json: bool = False
    verbose: int = 0
    console: Console = field(default_factory=lambda: Console(soft_wrap=True))

    def emit(self, data: Any, *, human: str | None = None) -> None:
        """Print ``data`` as JSON under ``--json``, else ``human`` (or a readable form of data)."""
        if self.json:
            click.echo(json.dumps(data, indent=2, default=str))
        elif human is not None:
            self.console.print(human, highlight=False)
        elif isinstance(data, dict):
            self.console.print(kv_table(data))
        else:
            click.echo(str(data))

    def table(self, rows: Sequence[dict[str, Any]], columns: Sequence[str], *,
              title: str | None = None, headers: Sequence[str] | None = None,
              data: Any = None) -> None:
        """A rich table for people; the rows (or ``data``) as JSON for scripts."""
        if self.json:
            click.echo(json.dumps(rows if data is None else data, indent=2, default=str))
            return
        t = Table(title=title, header_style="bold", box=None, pad_edge=False)
        for h in headers or columns:
            t.add_column(h)
        for r in rows:
            t.add_row(*[fmt(r.get(c)) for c in columns])
        if not rows:
            self.console.print(f"{title}: [dim]none[/dim]" if title else "[dim](none)[/dim]", highlight=False)
        else:
            self.console.print(t)


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x) for x in v) if v else "-"
    if isinstance(v, dict):
        return json.dumps(v)
    return str(v).replace("[", "\\[")


def kv_table(d: dict[str, Any]) -> Table:
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    for k, v in d.items():
        t.add_row(k, fmt(v))
    return t


def echo_err(msg: str) -> None:
    print(msg, file=sys.stderr)


def rows_of(items: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return list(items)
