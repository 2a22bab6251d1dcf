"""Every command answers --help; bad usage exits 2 with one line; no traceback ever."""

import os
import subprocess
import sys

import click
import pytest

from firezone.cli.main import cli


def _paths(cmd: click.Command, path: list[str]) -> list[list[str]]:
    out = [path]
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            out += _paths(sub, [*path, name])
    return out


@pytest.mark.parametrize("path", _paths(cli, []), ids=lambda p: " ".join(p) or "fz")
def test_help(path: list[str]) -> None:
    from click.testing import CliRunner

    r = CliRunner().invoke(cli, [*path, "--help"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "Usage:" in r.output


def _fz(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "firezone", *args], capture_output=True, text=True, timeout=60, env=e)


def test_usage_error_exit_2() -> None:
    r = _fz("portal", "init", "--bogus")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_unknown_command() -> None:
    r = _fz("frobnicate")
    assert r.returncode == 2 and "No such command" in r.stderr


def test_bad_config_file_is_one_line(tmp_path) -> None:
    bad = tmp_path / "c.toml"
    bad.write_text("= nope")
    r = _fz("--config", str(bad), "config", "show")
    assert r.returncode == 1
    assert r.stderr.startswith("fz: error:") and "invalid TOML" in r.stderr and "Traceback" not in r.stderr


def test_config_show_json(tmp_path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('portal_url = "http://from-file:8080"\n')
    r = _fz("--json", "--config", str(cfg), "config", "show", env={"FIREZONE_PORTAL_LISTEN": "127.0.0.1:9"})
    import json

    data = json.loads(r.stdout)
    assert data["settings"]["portal_url"] == "http://from-file:8080"
    assert data["sources"]["portal.listen"] == "env FIREZONE_PORTAL_LISTEN"


def test_portal_init_refuses_to_overwrite(tmp_path) -> None:
    env = {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "cfg"), "FIREZONE_CREDENTIALS": "file"}
    args = ["portal", "init", "--data-dir", str(tmp_path / "d"), "--account", "acme", "--admin-email", "a@b.test"]
    assert _fz(*args, env=env).returncode == 0
    r = _fz(*args, env=env)
    assert r.returncode == 1 and "already exists" in r.stderr
    cred = tmp_path / "cfg" / "firezone" / "credentials" / "admin.json"
    assert oct(cred.stat().st_mode & 0o777) == "0o600"


def test_python_dash_m_works() -> None:
    r = _fz("--version")
    assert r.returncode == 0 and "fz" in r.stdout
