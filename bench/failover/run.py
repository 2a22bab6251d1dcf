#!/usr/bin/env python3
"""Gateway failover: how long the client's traffic stops when the gateway in use dies.

One lab with the fz system and two gateways in one site (tests/e2e/fz_lab_system.py). The client
pings a resource every 100 ms (``ping -i 0.1 -D``, timestamps per reply); the gateway that serves
it (its log has "client connected") is stopped, by SIGKILL or by SIGTERM; the outage is the time
from the signal to the first reply after it, which then comes through the other gateway (checked
in that gateway's log). The stopped gateway is started again before the next repetition, so the
roles alternate. Goal: < 10 s.

    sudo .venv/bin/python bench/failover/run.py              # 10 x SIGKILL, 10 x SIGTERM
    sudo .venv/bin/python bench/failover/run.py --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from firezone.lab import Lab
from tests.e2e.fz_lab_system import FzSystem

SITE, USER, GROUP = "lab", "alice@acme.test", "eng"
TARGET = "198.51.100.10"
GATEWAYS = ("gateway-1", "gateway-2")
TIMEOUT = 60.0
REPLY = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from .*icmp_seq=(\d+)")


class Pinger:
    """A ``ping -i 0.1 -D`` in the client namespace; reply wall-clock times collected by a thread."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.replies: list[float] = []
        self.proc = lab.popen("client", ["ping", "-n", "-D", "-i", "0.1", "-W", "1", TARGET],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, name="ping")
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            m = REPLY.match(line)
            if m:
                self.replies.append(float(m.group(1)))

    def first_after(self, t: float) -> float | None:
        return next((r for r in self.replies if r > t), None)

    def close(self) -> None:
        self.lab.stop(self.proc)


def start_fz(lab: Lab, workdir: Path) -> FzSystem:
    fz = FzSystem(lab, workdir)
    fz.start_portal()
    fz.start_relays()
    fz.admin("site", "add", SITE)
    for gw in GATEWAYS:
        fz.start_gateway(gw, site=SITE)
    fz.admin("group", "add", GROUP)
    fz._groups.add(GROUP)
    fz.admin("resource", "add", "resource-net", "--site", SITE, "--address", "198.51.100.0/24")
    fz.admin("policy", "add", "--group", GROUP, "--resource", "resource-net")
    fz.start_client("client", user=USER, groups=(GROUP,))
    fz.wait(lambda: fz.curl("client", f"http://{TARGET}/", timeout=3).returncode == 0, 30, "resource via fz")
    return fz


def connected(fz: FzSystem, node: str) -> int:
    """Authorizations the gateway took (its "client connected" line follows ICE nomination,
    which may come after the first data, or rarely not within seconds)."""
    return sum(r.get("msg") == "access granted" for r in fz.log_records(node))


def one_failover(fz: FzSystem, ping: Pinger, sig: signal.Signals) -> tuple[float, str]:
    in_use = [n for n in GATEWAYS if connected(fz, n)]
    assert len(in_use) == 1, f"gateway in use unclear: {in_use}"
    (gone,) = in_use
    other = GATEWAYS[1 - GATEWAYS.index(gone)]
    before = connected(fz, other)
    proc = fz.procs.pop(gone)
    t0 = time.time()
    if sig == signal.SIGKILL:
        os.kill(proc.pid, signal.SIGKILL)
    fz.lab.stop(proc, timeout=10)  # SIGTERM and wait; after SIGKILL only reaps
    # Until it has exited a SIGTERMed gateway still forwards: count replies from after its exit
    # (plus a moment for one already on the wire), but time the failover from the signal.
    dead = time.time() + 0.2
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and ping.first_after(dead) is None:
        time.sleep(0.05)
    t1 = ping.first_after(dead)
    if t1 is None:
        raise RuntimeError(f"no reply within {TIMEOUT} s after {sig.name} of {gone}\n{fz.tails()}")
    if connected(fz, other) <= before:
        raise RuntimeError(f"replies flow again but {other} was never asked to serve the client")
    # bring the stopped gateway back for the next repetition, and let it settle with the portal
    fz.start_gateway(gone, site=SITE)
    time.sleep(3)
    return t1 - t0, gone


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--signals", default="KILL,TERM")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    res: dict[str, list[float]] = {}
    lab = Lab.up()
    try:
        with tempfile.TemporaryDirectory(prefix="fzbench-") as tmp:
            fz = start_fz(lab, Path(tmp))
            ping = Pinger(lab)
            time.sleep(1)
            for name in args.signals.split(","):
                sig = signal.Signals["SIG" + name]
                res[name] = []
                for i in range(args.reps):
                    took, gone = one_failover(fz, ping, sig)
                    res[name].append(took)
                    print(f"SIG{name} #{i + 1}: {gone} stopped, replies again after {took:.2f} s", flush=True)
            ping.close()
            for key in list(fz.procs):
                fz.stop(key)
    finally:
        lab.down()
    print()
    for name, v in res.items():
        print(f"SIG{name}: n={len(v)} p50 {statistics.median(v):.2f} s  max {max(v):.2f} s  "
              f"runs {', '.join(f'{x:.2f}' for x in v)}")
    print("\nJSON:", json.dumps(res))


if __name__ == "__main__":
    main()
