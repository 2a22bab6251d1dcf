"""Fixtures for end-to-end tests: a fresh network-namespace lab per test, always torn down.

Use ``lab`` for the default lab (easy NAT, no loss), or parametrize it indirectly::

    @pytest.mark.parametrize("lab", [{"nat": "symmetric"}], indirect=True)
    def test_relayed(lab): ...

``lab_factory(**kwargs)`` creates further labs (``Lab.up`` arguments) torn down after the test.
Labs left by a crashed earlier run (their creating process is gone) are removed once per session.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from firezone.lab import Lab
from firezone.lab.lab import proc_start_time


def _netns_names() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="session")
def _lab_janitor() -> None:
    if os.geteuid() != 0:
        pytest.fail("end-to-end tests need root (network namespaces, nftables)", pytrace=False)
    Lab.down_all(stale_only=True)


@pytest.fixture
def lab_factory(_lab_janitor: None) -> Iterator[Callable[..., Lab]]:
    labs: list[Lab] = []

    def make(**kwargs: Any) -> Lab:
        lab = Lab.up(**kwargs)
        labs.append(lab)
        return lab

    try:
        yield make
    finally:
        procs = [p for lab in labs for p in lab.processes()]
        for lab in labs:
            lab.down()
        left = [ns for lab in labs for ns in _netns_names() if ns.startswith(lab.prefix + "-")]
        assert not left, f"lab namespaces left after teardown: {left}"
        alive = [p for p in procs if proc_start_time(p["pid"]) == p["start"]]
        assert not alive, f"lab processes left after teardown: {alive}"


@pytest.fixture
def lab(request: pytest.FixtureRequest, lab_factory: Callable[..., Lab]) -> Lab:
    params = getattr(request, "param", None) or {}
    return lab_factory(**params)


def wait_for_line(proc: subprocess.Popen[str], expected: str, timeout: float = 10.0) -> None:
    """Read ``proc``'s stdout (a text PIPE) until a line equal to ``expected`` appears."""
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    seen: list[str] = []
    while time.monotonic() < deadline:
        if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
            break
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line.rstrip("\n"))
        if seen[-1] == expected:
            return
    raise AssertionError(f"{proc.args!r} did not print {expected!r} within {timeout} s; got {seen!r}"
                         f" (exit {proc.poll()})")
