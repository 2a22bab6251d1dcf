"""Completions and man pages are generated from the command tree; the committed ones must match."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_completions_and_man_pages_are_current() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_docs.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_command_has_a_man_page() -> None:
    import click

    from firezone.cli.main import cli

    def walk(cmd: click.Command, path: list[str]) -> list[str]:
        names = ["-".join(path)]
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                names += walk(sub, [*path, name])
        return names

    for name in walk(cli, ["fz"]):
        assert (ROOT / "man" / f"{name}.1").is_file(), name
    for shell_file in ("fz.bash", "_fz", "fz.fish"):
        assert (ROOT / "completions" / shell_file).stat().st_size > 100
