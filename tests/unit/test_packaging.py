"""The packaging stays true to the CLI: every unit's command line parses, the image runs `fz`."""

import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from firezone.cli.main import cli

ROOT = Path(__file__).resolve().parents[2]
UNITS = sorted((ROOT / "packaging" / "systemd").glob("*.service"))


def test_units_exist_for_every_role() -> None:
    assert {u.stem for u in UNITS} == {"fz-portal", "fz-relay", "fz-gateway", "fz-client"}


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_command_lines_parse(unit: Path) -> None:
    lines = [ln for ln in unit.read_text().splitlines() if ln.startswith("ExecStart=")]
    assert len(lines) == 1
    argv = shlex.split(lines[0].split("=", 1)[1])
    assert argv[0].endswith("/fz")
    # --help after the real options: click parses (and rejects unknown) options before printing help
    result = CliRunner().invoke(cli, [*argv[1:], "--help"], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def test_dockerfile_runs_fz_on_the_requested_base() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "FROM python:3.11-slim-bookworm AS build" in text
    assert 'ENTRYPOINT ["fz"]' in text
