"""`fz gateway up`, `fz client up/status/resources`: clear one-line errors before anything runs."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.cli.conftest import FZ, isolated_env


def _run(tmp_path: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    env = isolated_env(tmp_path)
    env.update(extra)
    return subprocess.run([*FZ, *args], env=env, capture_output=True, text=True, timeout=60, check=False)


def _one_line_error(r: subprocess.CompletedProcess[str], needle: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert needle in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_status_without_a_running_client(tmp_path: Path) -> None:
    sock = tmp_path / "none.sock"
    _one_line_error(_run(tmp_path, "client", "status", "--control-socket", str(sock)), "no fz client is running")
    _one_line_error(_run(tmp_path, "--json", "client", "resources", "--control-socket", str(sock)),
                    "start it with `fz client up`")


def test_client_up_without_sign_in(tmp_path: Path) -> None:
    _one_line_error(_run(tmp_path, "--portal", "http://127.0.0.1:9", "client", "up"), "not signed in")


def test_client_up_with_an_empty_token_file(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text("\n")
    _one_line_error(_run(tmp_path, "client", "up", "--token-file", str(f)), "is empty")


def test_gateway_up_without_portal_or_token(tmp_path: Path) -> None:
    _one_line_error(_run(tmp_path, "gateway", "up", FIREZONE_TOKEN="x"), "no portal URL")
    missing = tmp_path / "missing.token"
    _one_line_error(_run(tmp_path, "--portal", "http://127.0.0.1:9", "gateway", "up", "--token-file", str(missing)),
                    "no gateway token")


def test_help_texts() -> None:
    for args in (["gateway", "up"], ["client", "up"], ["client", "status"], ["client", "resources"]):
        r = subprocess.run([*FZ, *args, "--help"], capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0 and "Usage:" in r.stdout, r.stderr
