#!/usr/bin/env python3
"""Relay benchmark: turnutils_uclient through `fz relay run` and through coturn's turnserver.

Both relays run on loopback on this machine, one after the other inside one run, with the same
load: `turnutils_uclient -m CLIENTS -z 0 -c -n N -l SIZE` (ChannelData, unpaced) against a
`turnutils_peer` echo. uclient's own total time includes a random start delay, so we timestamp its
per-second progress lines ourselves and report the best 5-second window of round trips per second.
Also: loss as uclient reports it, and the relay process's CPU time (utime+stime from /proc) per
round trip.

    .venv/bin/python bench/relay/run.py                 # 100 B and 1200 B, 3 runs each
    .venv/bin/python bench/relay/run.py --sizes 100 --runs 1 --messages 50000
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.interop import relay_harness as h


def run_one(kind: str, size: int, clients: int, messages: int, workdir: Path,
            fz_args: list[str]) -> dict[str, float]:
    port = h.free_udp_port()
    peer_port = h.free_udp_port()
    lo, hi = h.port_block(400)
    relay_ports = (lo, lo + 199) if kind.startswith("fz") else (lo + 200, hi)
    sub = workdir / f"{kind}-{size}-{time.monotonic_ns()}"
    sub.mkdir()
    if kind.startswith("fz"):
        workers = kind.partition("-w")[2] or "1"
        server, secret_file = h.fz_relay(sub, listen=[f"127.0.0.1:{port}"], relay_ports=relay_ports,
                                         extra=["--workers", workers, *fz_args])
        try:
            h.wait_udp_stun("127.0.0.1", port)
            time.sleep(1.0 if workers != "1" else 0.0)  # workers bind after the first process
            user, password = h.fz_credentials(secret_file)
        except BaseException:
            server.stop()
            raise
    else:
        user, password = "bench", "benchpassword"
        server = h.coturn(sub, port=port, relay_ports=relay_ports, user=user, password=password)
        try:
            h.wait_udp_stun("127.0.0.1", port)
        except BaseException:
            server.stop()
            raise
    peer = h.turn_peer(sub, "127.0.0.1", peer_port)
    # Where datagrams were dropped: the kernel counts receive-buffer drops per socket.
    drops = {"relay": 0, "peer": 0, "client": 0}
    relay_pids = [server.pid, *_children(server.pid)]

    def sample(_t: float, _line: str, uclient_pid: int) -> None:
        by_inode = h.udp_drops_by_inode()
        for who, pids in (("relay", relay_pids), ("peer", [peer.pid]), ("client", [uclient_pid])):
            inodes = set().union(*(h.socket_inodes(p) for p in pids))
            drops[who] = max(drops[who], sum(by_inode.get(i, 0) for i in inodes))

    try:
        time.sleep(0.3)
        cpu0 = server.cpu_seconds() + _children_cpu(server.pid)
        res = h.uclient(["-m", str(clients), "-z", "0", "-c", "-n", str(messages), "-l", str(size),
                         "-u", user, "-w", password, "-e", "127.0.0.1", "-r", str(peer_port),
                         "-p", str(port)], "127.0.0.1", timeout=600, on_line=sample)
        cpu1 = server.cpu_seconds() + _children_cpu(server.pid)
        sample(0.0, "", 0)
    finally:
        peer.stop()
        server.stop()
    best = res.best_window(5.0)
    if res.received is None or best is None:
        raise RuntimeError(f"{kind}: uclient produced no totals (rc={res.returncode}):\n"
                           + res.output[-2000:])
    rate = best[0]
    return {
        "rt_per_s": rate,
        "mbit_one_way": rate * size * 8 / 1e6,
        "loss_pct": res.lost_pct if res.lost_pct is not None else float("nan"),
        "received": float(res.received),
        "cpu_us_per_rt": (cpu1 - cpu0) / max(1, res.received) * 1e6,
        "drops_relay": float(drops["relay"]),
        "drops_peer": float(drops["peer"]),
        "drops_client": float(drops["client"]),
    }


def _children(pid: int) -> list[int]:
    try:
        return [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _children_cpu(pid: int) -> float:
    """CPU of worker processes the relay started (fz relay with several workers)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for k in _children(pid):
        try:
            fields = Path(f"/proc/{k}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            pass
    return total


def machine() -> str:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    ver = subprocess.run(["turnserver", "--version"], capture_output=True, text=True, check=False).stdout.strip()
    import uvloop

    return (f"nproc={os.cpu_count()}, CPU {model}, kernel {platform.release()}, "
            f"Python {platform.python_version()}, uvloop {uvloop.__version__}, coturn {ver}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,1200", help="message sizes in bytes (comma-separated)")
    ap.add_argument("--runs", type=int, default=3, help="runs per relay and size (median reported)")
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--messages", type=int, default=120000, help="messages per client")
    ap.add_argument("--fz-args", default="", help="extra arguments for fz relay run")
    ap.add_argument("--relays", default="fz,fz-w2,coturn",
                    help="relays to run, comma-separated: fz (one process), fz-wN (N worker "
                         "processes), coturn")
    args = ap.parse_args()
    workdir = h.tmpdir("fzbench")
    print(f"# {machine()}")
    print(f"# uclient -m {args.clients} -z 0 -c -n {args.messages} (per client); best 5 s window")
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    for size in [int(s) for s in args.sizes.split(",")]:
        for r in range(args.runs):
            for kind in args.relays.split(","):
                m = run_one(kind, size, args.clients, args.messages, workdir, args.fz_args.split())
                results.setdefault((kind, size), []).append(m)
                print(f"run {r + 1} {kind:6s} {size:5d} B: {m['rt_per_s']:9.0f} rt/s "
                      f"{m['mbit_one_way']:7.1f} Mbit/s loss {m['loss_pct']:.3f} % "
                      f"cpu {m['cpu_us_per_rt']:.2f} us/rt; socket drops relay "
                      f"{m['drops_relay']:.0f} peer {m['drops_peer']:.0f} "
                      f"clients {m['drops_client']:.0f}", flush=True)
    print()
    print("| size | relay | round trips/s | Mbit/s one way | loss % | CPU us / round trip "
          "| drops at relay / peer / clients |")
    print("|---|---|---|---|---|---|---|")
    med: dict[tuple[str, int], dict[str, float]] = {}
    for (kind, size), ms in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0] == "coturn",
                                                                    kv[0][0])):
        med[(kind, size)] = {k: statistics.median(m[k] for m in ms) for k in ms[0]}
        d = med[(kind, size)]
        print(f"| {size} B | {kind} | {d['rt_per_s']:.0f} | {d['mbit_one_way']:.1f} | "
              f"{d['loss_pct']:.3f} | {d['cpu_us_per_rt']:.2f} | {d['drops_relay']:.0f} / "
              f"{d['drops_peer']:.0f} / {d['drops_client']:.0f} |")
    print()
    for size in sorted({s for _, s in med}):
        c = med.get(("coturn", size))
        for kind in sorted({k for k, s in med if s == size and k != "coturn"}):
            f = med[(kind, size)]
            if c:
                print(f"{size} B: {kind}/coturn round trips/s = {f['rt_per_s'] / c['rt_per_s']:.2f}x, "
                      f"CPU per round trip = {f['cpu_us_per_rt'] / c['cpu_us_per_rt']:.2f}x")


if __name__ == "__main__":
    main()
