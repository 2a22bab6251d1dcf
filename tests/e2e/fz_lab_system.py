"""The end-to-end tests' handle on the whole fz system in a lab (see firezone.lab.system).

``run_system`` is the body of a fixture that tears everything down with the lab (the lab stops
every process it started) and keeps the component logs under the test's tmp_path.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from firezone.lab import Lab
from firezone.lab.system import ACCOUNT, FZ, PORTAL_PORT, RELAY_PORT, FzSystem, FzSystemError

REPO = Path(__file__).resolve().parents[2]

__all__ = ["ACCOUNT", "FZ", "PORTAL_PORT", "RELAY_PORT", "REPO", "FzSystem", "FzSystemError", "run_system"]


def run_system(lab: Lab, workdir: Path) -> Iterator[FzSystem]:
    """Fixture body: an FzSystem on ``lab``; its logs are copied to ``workdir/logs`` afterwards.

    Use it as ``@pytest.fixture def fz(lab, tmp_path): yield from run_system(lab, tmp_path)``.
    """
    sysm = FzSystem(lab, workdir)
    try:
        yield sysm
    finally:
        for key in list(sysm.procs):
            try:
                sysm.stop(key)
            except Exception as e:  # noqa: BLE001 - the lab's teardown stops what is left
                print(f"stopping {key} failed: {e}", file=sys.stderr)
        keep = workdir / "logs"
        keep.mkdir(exist_ok=True)
        for p in sysm.logs:
            if p.exists():
                shutil.copy(p, keep / p.name)
