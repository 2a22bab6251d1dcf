"""What the image's build stage produces: a wheel of fz that runs on its own.

The Dockerfile builds a wheel (``pip wheel .``) and installs it in a clean Python. This does the
same without Docker: the wheel goes into a fresh venv (the dependencies come from the test venv,
so no network is needed), and the installed ``fz`` initializes and serves a portal whose sign-in
page, stylesheet and migrations all come from the wheel.
"""

from __future__ import annotations

import site
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.cli.conftest import free_port, isolated_env

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(240)


def _run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=180, check=False,
                          stdin=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]


def test_wheel_installs_and_serves_a_portal(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    r = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(wheels), str(ROOT)])
    assert r.returncode == 0, r.stderr
    (wheel,) = wheels.glob("firezone-*.whl")

    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", "--without-pip", str(venv)]).returncode == 0
    py = venv / "bin" / "python"
    purelib = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # Dependencies from the test venv, appended after the new venv's own site-packages (a plain
    # path entry: the editable install's hooks in there are not run, so `firezone` is the wheel's).
    (purelib / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    r = _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)])
    assert r.returncode == 0, r.stderr
    fz = venv / "bin" / "fz"
    where = _run([str(py), "-c", "import firezone; print(firezone.__file__)"], cwd=tmp_path)
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr

    env = isolated_env(tmp_path / "home")
    env.pop("PYTHONPATH", None)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data = tmp_path / "portal"
    r = _run([str(fz), "portal", "init", "--data-dir", str(data), "--account", "acme", "--admin-email",
              "admin@acme.test", "--url", url], env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    log = (tmp_path / "portal.log").open("wb")
    proc = subprocess.Popen([str(fz), "portal", "serve", "--data-dir", str(data), "--listen", f"127.0.0.1:{port}"],
                            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=2) as resp:
                    assert resp.status == 200
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "portal.log").read_text()
                time.sleep(0.2)
        with urllib.request.urlopen(url + "/acme", timeout=5) as resp:
            page = resp.read().decode()
        assert "acme" in page and "<form" in page, page[:500]
        with urllib.request.urlopen(url + "/static/fz.css", timeout=5) as resp:
            assert resp.status == 200 and resp.read()
        r = _run([str(fz), "--json", "--portal", url, "site", "add", "HQ"], env=env, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
    assert "Traceback" not in (tmp_path / "portal.log").read_text()
