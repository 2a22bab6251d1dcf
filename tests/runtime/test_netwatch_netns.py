"""NetWatcher against the real kernel, in a network namespace the test creates (needs root).

A child process runs the watcher (under uvloop, as ``fz client up`` does) inside the namespace
and prints one line per debounced callback; the test changes addresses and routes with ``ip``.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

REPO = Path(__file__).resolve().parents[2]
DEBOUNCE = 0.3
QUIET = 1.5  # well past the debounce: a callback would have come by then

CHILD = f"""
import asyncio, sys
import uvloop
from firezone.runtime.netwatch import NetWatcher

async def main():
    w = NetWatcher(lambda: print("change", flush=True), ignore=("lo", "ign0"), debounce={DEBOUNCE})
    await w.start()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    w.close()

uvloop.run(main())
"""


def ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.fail("this test needs root (network namespaces)", pytrace=False)
    ns = f"fzt{os.getpid()}nw"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    try:
        ip(ns, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
        ip(ns, "link", "add", "ign0", "type", "veth", "peer", "name", "ign1")
        for dev in ("lo", "eth0", "peer0", "ign0", "ign1"):
            ip(ns, "link", "set", dev, "up")
        ip(ns, "addr", "add", "192.0.2.1/25", "dev", "peer0")
        ip(ns, "addr", "add", "192.0.2.10/25", "dev", "eth0")
        ip(ns, "route", "add", "default", "via", "192.0.2.1")
        subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.conf.eth0.promote_secondaries=1"],
                       check=True, timeout=10)
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, timeout=10)
        left = subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True).stdout
        assert ns not in left.split(), f"namespace {ns} left behind"


class Watcher:
    def __init__(self, ns: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", CHILD], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        assert self.next(10) == "ready", self.stderr()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def next(self, timeout: float) -> str | None:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return None

    def changes_within(self, seconds: float) -> int:
        n = 0
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            line = self.next(left)
            if line == "change":
                n += 1
            elif line is not None:
                raise AssertionError(f"unexpected output {line!r}")
        return n

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return ""
        assert self.proc.stderr is not None
        return self.proc.stderr.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def watcher(netns: str) -> Iterator[Watcher]:
    w = Watcher(netns)
    try:
        yield w
    finally:
        w.close()
    assert w.proc.returncode == 0, w.stderr()


def test_a_roam_is_one_debounced_change(netns: str, watcher: Watcher) -> None:
    assert watcher.changes_within(QUIET) == 0  # a quiet network: nothing
    ip(netns, "addr", "add", "192.0.2.12/25", "dev", "eth0")
    ip(netns, "addr", "add", "2001:db8:2::12/64", "dev", "eth0", "nodad")
    ip(netns, "route", "replace", "default", "via", "192.0.2.1", "dev", "eth0", "src", "192.0.2.12")
    ip(netns, "addr", "del", "192.0.2.10/25", "dev", "eth0")
    assert watcher.changes_within(QUIET + DEBOUNCE) == 1


def test_single_changes_each_count(netns: str, watcher: Watcher) -> None:
    ip(netns, "addr", "add", "192.0.2.20/25", "dev", "eth0")
    assert watcher.changes_within(QUIET) == 1
    ip(netns, "addr", "del", "192.0.2.20/25", "dev", "eth0")
    assert watcher.changes_within(QUIET) == 1
    ip(netns, "route", "replace", "default", "via", "192.0.2.2", "dev", "eth0", "onlink")
    assert watcher.changes_within(QUIET) == 1
    ip(netns, "link", "set", "eth0", "down")  # the kernel drops the IPv4 default route silently
    assert watcher.changes_within(QUIET) == 1


def test_noise_and_ignored_devices_cause_no_change(netns: str, watcher: Watcher) -> None:
    ip(netns, "addr", "add", "10.9.9.9/24", "dev", "ign0")
    ip(netns, "addr", "add", "2001:db8:99::9/64", "dev", "ign0", "nodad")
    ip(netns, "route", "add", "default", "dev", "ign0", "metric", "50")
    ip(netns, "route", "add", "203.0.113.0/24", "via", "192.0.2.1")  # not a default route
    ip(netns, "addr", "add", "127.0.0.2/8", "dev", "lo")
    ip(netns, "addr", "change", "192.0.2.10/25", "dev", "eth0", "valid_lft", "3600", "preferred_lft", "3600")
    ip(netns, "route", "del", "default", "dev", "ign0", "metric", "50")
    ip(netns, "addr", "del", "10.9.9.9/24", "dev", "ign0")
    assert watcher.changes_within(QUIET + DEBOUNCE) == 0
