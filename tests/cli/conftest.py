"""A real ``fz portal serve`` on a free loopback port, and a way to run ``fz`` against it.

Every ``fz`` runs as a subprocess with HOME and the XDG directories pointed into a temporary
directory and ``FIREZONE_CREDENTIALS=file``, so nothing of the invoking user is read or written.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from firezone.lab.system import isolated_env  # noqa: F401  (re-exported for the tests)

FZ = [sys.executable, "-m", "firezone"]
ADMIN_EMAIL = "admin@example.com"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])




@dataclass
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        try:
            return json.loads(self.stdout)
        except ValueError:
            raise AssertionError(f"fz {' '.join(self.args)}: stdout is not JSON:\n{self.stdout}\n"
                                 f"stderr:\n{self.stderr}") from None

    def __str__(self) -> str:
        return (f"fz {' '.join(self.args)} -> exit {self.returncode}\n"
                f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}")


@dataclass
class ServedPortal:
    url: str
    env: dict[str, str]
    root: Path
    log_path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def fz(self, *args: str, env: dict[str, str] | None = None, expect: int | None = 0,
           timeout: float = 30) -> Result:
        """Run ``fz ARGS`` with this portal's environment; check the exit code unless expect=None."""
        proc = subprocess.run([*FZ, *args], env=env if env is not None else self.env,
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
        r = Result(list(args), proc.returncode, proc.stdout, proc.stderr)
        assert "Traceback" not in r.stderr, str(r)
        if expect is not None:
            assert r.returncode == expect, str(r)
        return r

    def fz_json(self, *args: str, **kw: Any) -> Any:
        return self.fz("--json", *args, **kw).json()

    def admin_token(self) -> str:
        path = Path(self.env["XDG_CONFIG_HOME"]) / "firezone" / "credentials" / "admin.json"
        return str(json.loads(path.read_text())["token"])


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log_path: Path, deadline: float) -> None:
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"fz portal serve exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    raise AssertionError(f"portal at {url} not healthy in time ({last}):\n{log_path.read_text()}")


@pytest.fixture(scope="module")
def served_portal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedPortal]:
    root = tmp_path_factory.mktemp("portal")
    env = isolated_env(root / "admin")
    data_dir = root / "portal-data"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    init = subprocess.run([*FZ, "portal", "init", "--data-dir", str(data_dir), "--account", "acme",
                           "--admin-email", ADMIN_EMAIL, "--url", url],
                          env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False)
    assert init.returncode == 0, f"fz portal init failed:\n{init.stdout}\n{init.stderr}"
    log_path = root / "portal.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([*FZ, "portal", "serve", "--data-dir", str(data_dir),
                                 "--listen", f"127.0.0.1:{port}"],
                                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_healthy(url, proc, log_path, time.monotonic() + 30)
        yield ServedPortal(url=url, env=env, root=root, log_path=log_path, extra={"data_dir": data_dir})
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
    text = log_path.read_text(errors="replace")
    assert "Traceback" not in text, f"portal log has a traceback:\n{text}"
