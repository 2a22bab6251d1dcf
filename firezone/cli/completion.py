"""``fz completion``: shell completion scripts generated from the command tree."""

from __future__ import annotations

import click
from click.shell_completion import get_completion_class


def completion_script(shell: str) -> str:
    from firezone.cli.main import cli

    cls = get_completion_class(shell)
    if cls is None:  # pragma: no cover - click.Choice guards this
        raise click.UsageError(f"unsupported shell {shell!r}")
    return cls(cli, {}, "fz", "_FZ_COMPLETE").source()


@click.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the completion script for SHELL.

    \b
    bash:  fz completion bash > /etc/bash_completion.d/fz
    zsh:   fz completion zsh > "${fpath[1]}/_fz"
    fish:  fz completion fish > ~/.config/fish/completions/fz.fish
    """
    click.echo(completion_script(shell), nl=False)
