#!/usr/bin/env python3
"""WireGuard tunnel throughput: fz <-> fz against wireguard-go <-> wireguard-go and plain veth.

The same two-namespace topology is built for each mode, then:
  * iperf3 TCP, one stream, N runs x T seconds -> median Mbit/s, plus the CPU the two WireGuard
    processes used (from /proc/<pid>/stat), in cores;
  * iperf3 UDP with 64-byte payloads: the highest packet rate with < 1 % loss (bisection).
Optionally py-spy records both fz ends during one extra TCP run and prints where the time goes.

    sudo .venv/bin/python bench/wg_throughput/run.py            # full: 5 x 10 s
    sudo .venv/bin/python bench/wg_throughput/run.py --quick    # 2 x 3 s, coarse UDP search
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.interop import wg_helpers as h
from tests.interop.netns import Netns, Topology

A_UNDER, B_UNDER = "192.0.2.1", "192.0.2.2"
A_TUN, B_TUN = "100.64.0.1", "100.64.0.2"
MTU = 1420  # wireguard-go's default; both WireGuard modes use it
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(f[11]) + int(f[12])) / CLK_TCK
    return total


class Setup:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.topo = Topology("b" + mode[:2] + ("n" if mode == "fz-nooffload" else ""))
        self.a, self.b = self.topo.netns("a"), self.topo.netns("b")
        self.topo.veth(self.a, self.b, f"{A_UNDER}/24", f"{B_UNDER}/24")
        self.pids: list[int] = []
        self.target = B_UNDER
        self.iperf = self.b.popen(["iperf3", "-s"], log_name="iperf3")
        if mode == "veth":
            time.sleep(0.3)
            return
        ka, kb = h.keypair(), h.keypair()
        kind = "fz" if mode.startswith("fz") else "wggo"
        extra = ["--no-gso", "--no-gro", "--no-tun-offload"] if mode == "fz-nooffload" else []
        A = h.Side(self.a, self.topo.ifname("a"), *ka, 51820, A_TUN, kind)
        B = h.Side(self.b, self.topo.ifname("b"), *kb, 51821, B_TUN, kind)
        A.peers = [h.PeerSpec(kb[1], [f"{B_TUN}/32"], endpoint=f"{B_UNDER}:51821")]
        B.peers = [h.PeerSpec(ka[1], [f"{A_TUN}/32"])]
        for side in (A, B):
            if kind == "fz":
                h.start_fz(side, mtu=MTU, extra_args=extra)
            else:
                h.start_wggo(side, mtu=MTU)
            self.pids.append(side.proc.pid)
        self.sides = (A, B)
        self.target = B_TUN
        h.ping_until_up(self.a, B_TUN)

    def close(self) -> None:
        self.topo.close()


def iperf_json(ns: Netns, args: list[str], timeout: float) -> dict:
    r = ns.run(["iperf3", "-J", *args], check=False, timeout=timeout)
    try:
        return json.loads(r.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"iperf3 {' '.join(args)}: {r.stdout[-500:]} {r.stderr[-500:]}") from None


def tcp_runs(s: Setup, runs: int, secs: int) -> tuple[list[float], list[float]]:
    mbps, cores = [], []
    for _ in range(runs):
        c0, t0 = cpu_seconds(s.pids), time.monotonic()
        j = iperf_json(s.a, ["-c", s.target, "-t", str(secs), "-O", "1"], timeout=secs + 30)
        if "error" in j:
            raise RuntimeError(f"iperf3 TCP: {j['error']}")
        c1, t1 = cpu_seconds(s.pids), time.monotonic()
        mbps.append(j["end"]["sum_received"]["bits_per_second"] / 1e6)
        cores.append((c1 - c0) / (t1 - t0) if s.pids else 0.0)
    return mbps, cores


def udp_probe(s: Setup, pps: int, secs: int) -> tuple[float, float]:
    """Offer ``pps`` 64-byte datagrams per second; return (received pps, loss %)."""
    # -w: 4 MB socket buffers, so bursts are not lost in iperf3's own receive queue
    j = iperf_json(s.a, ["-c", s.target, "-u", "-l", "64", "-w", "4M", "-b", str(pps * 64 * 8),
                         "-t", str(secs)],
                   timeout=secs + 30)
    if "error" in j:
        raise RuntimeError(f"iperf3 UDP: {j['error']}")
    summ = j["end"]["sum"]
    received = summ["packets"] - summ["lost_packets"]
    return received / summ["seconds"], summ["lost_percent"]


def udp_max_pps(s: Setup, secs: int, steps: int) -> float:
    """Double the offered rate until loss reaches 1 %, then bisect; return the best received pps."""
    rate, lo, hi, best = 20_000.0, 0.0, None, 0.0
    for _ in range(steps):
        got, loss = udp_probe(s, int(rate), secs)
        if loss < 1.0:
            best, lo = max(best, got), rate
            rate = rate * 2 if hi is None else (lo + hi) / 2
        else:
            hi = rate
            rate = (lo + hi) / 2
    return best


def pyspy(s: Setup, secs: int, out_dir: Path) -> dict[str, list[tuple[str, float]]]:
    """Record both fz processes during a TCP run; return the top self-time frames per side."""
    py_spy = str(Path(sys.executable).with_name("py-spy"))
    recs = []
    for side, pid in zip("ab", s.pids):
        out = out_dir / f"pyspy-{side}.txt"
        recs.append((side, out, subprocess.Popen(
            [py_spy, "record", "--pid", str(pid), "--duration", str(secs), "--rate", "200",
             "--format", "raw", "--output", str(out), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    time.sleep(0.5)
    iperf_json(s.a, ["-c", s.target, "-t", str(secs)], timeout=secs + 30)
    summary = {}
    for side, out, p in recs:
        p.wait(timeout=secs + 30)
        summary[side] = summarize_raw(out)
    return summary


def summarize_raw(path: Path, top: int = 12) -> list[tuple[str, float]]:
    """Self time per leaf frame (function + file) from py-spy's collapsed-stack output."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    if not path.exists():
        return []
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        leaf = stack.split(";")[-1]
        # "func (file.py:123)" -> "func (file.py)"
        name = leaf.split(":")[0] + ")" if "(" in leaf else leaf
        counts[name] += int(n)
        total += int(n)
    return [(k, 100.0 * v / total) for k, v in counts.most_common(top)] if total else []


def machine() -> dict[str, str]:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), "?")
    def ver(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.splitlines()[0]
        except (OSError, IndexError):
            return "?"
    import cryptography
    import uvloop
    return {"nproc": str(os.cpu_count()), "cpu": model, "kernel": platform.release(),
            "python": platform.python_version(), "uvloop": uvloop.__version__,
            "cryptography": cryptography.__version__, "wireguard-go": ver(["wireguard-go", "--version"]),
            "iperf3": ver(["iperf3", "--version"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--secs", type=int, default=10)
    ap.add_argument("--udp-secs", type=int, default=3)
    ap.add_argument("--udp-steps", type=int, default=8)
    ap.add_argument("--modes", default="fz,wggo,veth",
                    help="comma-separated: fz, fz-nooffload (no UDP GSO/GRO, no TUN offload), "
                         "wggo, veth")
    ap.add_argument("--quick", action="store_true", help="2 runs x 3 s, 5 UDP steps")
    ap.add_argument("--profile", action="store_true", help="py-spy both fz ends during one TCP run")
    ap.add_argument("--no-udp", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.runs, args.secs, args.udp_steps, args.udp_secs = 2, 3, 5, 2
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces, TUN)")
    # so that a SIGTERM (e.g. from timeout) still tears the namespaces down
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    modes = args.modes.split(",")
    results: dict[str, dict] = {m: {"tcp_mbps": [], "cores": []} for m in modes}
    profile = None
    setups: dict[str, Setup] = {}
    try:
        for mode in modes:
            setups[mode] = Setup(mode)
        # Runs of the modes alternate, so a change in background load hits all of them alike.
        for _ in range(args.runs):
            for mode in modes:
                mbps, cores = tcp_runs(setups[mode], 1, args.secs)
                results[mode]["tcp_mbps"] += mbps
                results[mode]["cores"] += cores
        for mode in modes:
            r = results[mode]
            r["tcp_median"] = statistics.median(r["tcp_mbps"])
            r["cores_median"] = statistics.median(r["cores"])
            if not args.no_udp:
                r["udp_pps"] = udp_max_pps(setups[mode], args.udp_secs, args.udp_steps)
            print(f"{mode:12s} TCP median {r['tcp_median']:8.1f} Mbit/s  runs "
                  f"{', '.join(f'{x:.0f}' for x in r['tcp_mbps'])}  CPU {r['cores_median']:.2f} cores"
                  + (f"  UDP64 {r['udp_pps']:,.0f} pps <1% loss" if "udp_pps" in r else ""), flush=True)
        if args.profile and "fz" in setups:
            profile = pyspy(setups["fz"], args.secs, setups["fz"].topo.log_dir)
    finally:
        for s in setups.values():
            s.close()
    print()
    for k, v in machine().items():
        print(f"{k}: {v}")
    if "fz" in results and "wggo" in results:
        print(f"ratio fz / wireguard-go: TCP {results['fz']['tcp_median'] / results['wggo']['tcp_median']:.2f}"
              + (f", UDP pps {results['fz']['udp_pps'] / results['wggo']['udp_pps']:.2f}"
                 if "udp_pps" in results["fz"] else ""))
    if profile:
        for side, rows in profile.items():
            print(f"\npy-spy self time, fz {'sender' if side == 'a' else 'receiver'} ({side}); "
                  "C calls (syscalls, AEAD) count toward the Python function calling them, "
                  "Runner.run is uvloop waiting in epoll:")
            for name, pct in rows:
                print(f"  {pct:5.1f}%  {name}")
    print("\nJSON:", json.dumps({"results": results, "machine": machine()}))


if __name__ == "__main__":
    main()
