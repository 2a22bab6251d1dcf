#!/usr/bin/env python3
"""Generate shell completions (completions/) and man pages (man/) from the click command tree.

Usage: python scripts/gen_docs.py [--check] [--out DIR]

--check compares instead of writing and exits 1 listing stale or missing files (the test suite runs
this so the committed files cannot drift from the commands).
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from firezone import __version__  # noqa: E402
from firezone.cli.completion import completion_script  # noqa: E402
from firezone.cli.main import cli  # noqa: E402

SHELLS = {"bash": "fz.bash", "zsh": "_fz", "fish": "fz.fish"}


def _roff(text: str) -> str:
    out = []
    for line in text.splitlines():
        line = line.replace("\\", "\\e").replace("-", "\\-")
        if line.startswith((".", "'")):
            line = "\\&" + line
        out.append(line)
    return "\n".join(out)


def _paragraphs(help_text: str) -> list[str]:
    """Paragraphs as roff: reflowed text, or verbatim lines for click's \\b blocks."""
    out = []
    for para in inspect.cleandoc(click.unstyle(help_text or "")).split("\n\n"):
        if not para.strip():
            continue
        if para.startswith("\b\n"):
            out.append(".nf\n" + _roff(para[2:]) + "\n.fi")
        else:
            out.append(_roff(" ".join(line.strip() for line in para.splitlines())))
    return out


def _usage(ctx: click.Context, cmd: click.Command) -> str:
    pieces = cmd.collect_usage_pieces(ctx)
    return " ".join([ctx.command_path, *pieces])


def man_page(cmd: click.Command, path: list[str], parent: click.Context | None) -> str:
    ctx = click.Context(cmd, info_name=path[-1], parent=parent)
    title = "-".join(path)
    lines = [f'.TH "{title.upper()}" "1" "" "fz {__version__}" "fz manual"', ".SH NAME",
             f"{_roff(title)} \\- {_roff(cmd.get_short_help_str(limit=200))}", ".SH SYNOPSIS",
             f".B {_roff(_usage(ctx, cmd))}", ".SH DESCRIPTION"]
    for para in _paragraphs(cmd.help or ""):
        lines += [".PP", para]
    opts = [p for p in cmd.get_params(ctx) if isinstance(p, click.Option) and not p.hidden]
    args = [p for p in cmd.get_params(ctx) if isinstance(p, click.Argument)]
    if args:
        lines.append(".SH ARGUMENTS")
        for a in args:
            choices = f" (one of: {', '.join(a.type.choices)})" if isinstance(a.type, click.Choice) else ""
            lines += [".TP", f".B {_roff(a.human_readable_name)}", _roff(f"Required{choices}." if a.required else f"Optional{choices}.")]
    if opts:
        lines.append(".SH OPTIONS")
        for o in opts:
            record = o.get_help_record(ctx)
            if record is None:
                continue
            names, help_text = record
            lines += [".TP", f".B {_roff(names)}", _roff(click.unstyle(help_text) or "")]
    if isinstance(cmd, click.Group):
        lines.append(".SH COMMANDS")
        for name in sorted(cmd.list_commands(ctx)):
            sub = cmd.get_command(ctx, name)
            if sub is None or sub.hidden:
                continue
            lines += [".TP", f".B {_roff(' '.join([*path, name]))}",
                      _roff(sub.get_short_help_str(limit=200)) + f" See \\fB{'-'.join([*path, name])}\\fR(1)."]
    if len(path) > 1:
        lines += [".SH SEE ALSO", f"\\fB{'-'.join(path[:-1])}\\fR(1)"]
    return "\n".join(lines) + "\n"


def all_pages() -> dict[str, str]:
    pages: dict[str, str] = {}

    def walk(cmd: click.Command, path: list[str], parent: click.Context | None) -> None:
        pages["-".join(path) + ".1"] = man_page(cmd, path, parent)
        if isinstance(cmd, click.Group):
            ctx = click.Context(cmd, info_name=path[-1], parent=parent)
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                if sub is not None and not sub.hidden:
                    walk(sub, [*path, name], ctx)

    walk(cli, ["fz"], None)
    return pages


def expected_files() -> dict[Path, str]:
    files = {ROOT / "completions" / fname: completion_script(shell) for shell, fname in SHELLS.items()}
    files.update({ROOT / "man" / name: text for name, text in all_pages().items()})
    return files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    args = ap.parse_args()
    files = expected_files()
    if args.check:
        stale = [str(p.relative_to(ROOT)) for p, text in files.items() if not p.exists() or p.read_text() != text]
        extra = [str(p.relative_to(ROOT)) for d in ("man",) for p in (ROOT / d).glob("*.1") if p not in files]
        if stale or extra:
            print("stale or missing: " + ", ".join(stale + [f"{e} (no such command)" for e in extra]))
            print("run: python scripts/gen_docs.py")
            return 1
        return 0
    for d in ("completions", "man"):
        (ROOT / d).mkdir(exist_ok=True)
    for p in (ROOT / "man").glob("*.1"):
        if p not in files:
            p.unlink()
    for p, text in files.items():
        p.write_text(text)
    print(f"wrote {len(files)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
