#!/usr/bin/env python3
"""DNS stub benchmark: dnsperf against fz's split-DNS stub and against dnsmasq, side by side.

Topology (all on per-run 127.0.0.0/8 addresses, all started and stopped here):

    dnsperf ──► dnsmasq  --cache-size=0 --server=U   (anchor: a plain forwarder)
    dnsperf ──► fz DnsServer + DnsStub (uvloop)       (ours: pass-through names are forwarded to U,
                                                        resource names answered locally)
    dnsperf ──► U = dnsmasq holding the zone           (direct: the baseline for "added latency")

Measured, each `--reps` times (medians printed):
- throughput: dnsperf with 100 queries outstanding for `--seconds`, queries/s;
- latency: dnsperf at a fixed 2000 queries/s with per-query latencies (-v), p50 / p99;
  "added" = via the forwarder minus direct to U.

Run as root or not (no namespaces needed):  .venv/bin/python bench/dns/run.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

N_NAMES = 1000
NET = f"127.{90 + os.getpid() % 100}.{os.getpid() // 100 % 250}"
UPSTREAM = (f"{NET}.1", 5301)
ANCHOR = (f"{NET}.2", 5302)
OURS = (f"{NET}.3", 5303)


def serve(host: str, port: int, up_host: str, up_port: int) -> None:
    """Run fz's stub server until killed (the benchmarked process)."""
    import uvloop

    from firezone.proto.dns.stub import DnsStub
    from firezone.runtime.dns_listen import DnsServer

    async def main() -> None:
        stub = DnsStub()
        sentinel = stub.set_upstreams([(up_host, up_port)])[0]
        stub.set_resources([("r-bench", "**.svc.test")])
        server = DnsServer(stub, asyncio.get_running_loop())
        await server.start([(host, port, sentinel)])
        print("ready", flush=True)
        drain = 0.0
        while True:
            await asyncio.sleep(1.0)
            while stub.poll_event() is not None:  # the client drains these; keep memory flat
                drain += 1

    uvloop.run(main())


def stub_cost(n: int = 50000) -> dict[str, tuple[float, float]]:
    """Per-query decision time of DnsStub.handle_query alone (no sockets), p50 / p99 in µs."""
    import dns.message

    from firezone.proto.dns.stub import DnsStub

    stub = DnsStub()
    sentinel = stub.set_upstreams([UPSTREAM])[0]
    stub.set_resources([("r-bench", "**.svc.test")])
    out = {}
    for label, fmt in (("pass-through", "n{}.zone.test"), ("resource", "h{}.svc.test")):
        wires = [dns.message.make_query(fmt.format(i), "A", use_edns=0).to_wire()
                 for i in range(N_NAMES)]
        for w in wires:  # first queries assign the proxy IPs
            stub.handle_query(w, sentinel=sentinel, tcp=False, now=0.0)
        times = []
        clock = time.perf_counter_ns
        for i in range(n):
            w = wires[i % N_NAMES]
            t0 = clock()
            stub.handle_query(w, sentinel=sentinel, tcp=False, now=0.0)
            times.append((clock() - t0) / 1000)
            while stub.poll_event() is not None:
                pass
        out[label] = (pct(times, 50), pct(times, 99))
    return out


def start(cmd: list[str], ready: str | None = None) -> subprocess.Popen[str]:
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if ready is not None:
        assert p.stdout is not None
        line = p.stdout.readline()
        if ready not in line:
            p.kill()
            raise RuntimeError(f"{cmd[0]} did not start: {line}{p.stdout.read()}")
    return p


def wait_dns(host: str, port: int) -> None:
    for _ in range(100):
        r = subprocess.run(["dig", f"@{host}", "-p", str(port), "+time=1", "+tries=1", "+short",
                            "n0.zone.test"], capture_output=True, text=True, check=False)
        if r.returncode == 0 and r.stdout.strip():
            return
        time.sleep(0.1)
    raise RuntimeError(f"no DNS answer from {host}:{port}")


def dnsperf(target: tuple[str, int], qfile: Path, seconds: float, *, qps: int | None = None,
            verbose: bool = False) -> tuple[float, list[float]]:
    cmd = ["dnsperf", "-s", target[0], "-p", str(target[1]), "-d", str(qfile), "-l", str(seconds),
           "-c", "1", "-T", "1", "-q", "100", "-t", "2"]
    if qps:
        cmd += ["-Q", str(qps)]
    if verbose:
        cmd += ["-v"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 30).stdout
    m = re.search(r"Queries per second:\s+([\d.]+)", out)
    lost = re.search(r"Queries lost:\s+(\d+)", out)
    assert m and lost, out
    lat = [float(x) * 1000 for x in re.findall(r"^> NOERROR \S+ \S+ ([\d.]+)$", out, re.MULTILINE)]
    if verbose and not lat:
        raise RuntimeError(out)
    if int(lost.group(1)):
        print(f"  ({lost.group(1)} queries lost)", flush=True)
    return float(m.group(1)), lat


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rate", type=int, default=2000, help="queries/s for the latency runs")
    ap.add_argument("--serve", nargs=4, metavar=("HOST", "PORT", "UP_HOST", "UP_PORT"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]), args.serve[2], int(args.serve[3]))
        return
    for tool in ("dnsmasq", "dnsperf", "dig"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed")

    tmp = Path(tempfile.mkdtemp(prefix="fz-bench-dns-"))
    zone = tmp / "zone.conf"
    zone.write_text("local=/zone.test/\n" + "".join(
        f"host-record=n{i}.zone.test,192.0.2.{i % 250 + 1}\n" for i in range(N_NAMES)))
    pass_q = tmp / "pass.txt"
    pass_q.write_text("".join(f"n{i}.zone.test A\n" for i in range(N_NAMES)))
    res_q = tmp / "resource.txt"
    res_q.write_text("".join(f"h{i}.svc.test A\n" for i in range(N_NAMES)))

    common = ["--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll", "--pid-file=",
              "--bind-interfaces", "--log-facility=-"]
    procs: list[subprocess.Popen[str]] = []
    try:
        procs.append(start(["dnsmasq", *common, f"--conf-file={zone}",
                            f"--listen-address={UPSTREAM[0]}", f"--port={UPSTREAM[1]}"]))
        procs.append(start(["dnsmasq", *common, "--cache-size=0",
                            f"--server={UPSTREAM[0]}#{UPSTREAM[1]}",
                            f"--listen-address={ANCHOR[0]}", f"--port={ANCHOR[1]}"]))
        procs.append(start([sys.executable, __file__, "--serve", OURS[0], str(OURS[1]),
                            UPSTREAM[0], str(UPSTREAM[1])], ready="ready"))
        for t in (UPSTREAM, ANCHOR, OURS):
            wait_dns(*t)
        dnsperf(OURS, res_q, 1.0, qps=N_NAMES * 2)  # warm up: every resource name has its IPs

        runs = {
            "throughput dnsmasq (pass-through)": (ANCHOR, pass_q, None),
            "throughput fz (pass-through)": (OURS, pass_q, None),
            "throughput fz (resource names)": (OURS, res_q, None),
            "latency direct upstream": (UPSTREAM, pass_q, args.rate),
            "latency dnsmasq (pass-through)": (ANCHOR, pass_q, args.rate),
            "latency fz (pass-through)": (OURS, pass_q, args.rate),
            "latency fz (resource names)": (OURS, res_q, args.rate),
        }
        results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in runs}
        for rep in range(args.reps):
            for name, (target, qfile, rate) in runs.items():
                qps, lat = dnsperf(target, qfile, args.seconds if rate is None else 5.0, qps=rate,
                                   verbose=rate is not None)
                p50 = pct(lat, 50) if lat else float("nan")
                p99 = pct(lat, 99) if lat else float("nan")
                results[name].append((qps, p50, p99))
                print(f"rep {rep + 1} {name:38s} {qps:9.0f} q/s"
                      + (f"  p50 {p50:.3f} ms  p99 {p99:.3f} ms" if lat else ""), flush=True)
        med = {k: tuple(statistics.median(r[i] for r in v) for i in range(3))
               for k, v in results.items()}
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    cost = stub_cost()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                .splitlines() if line.startswith("model name")), "?")
    ver = subprocess.run(["dnsmasq", "--version"], capture_output=True, text=True, check=False).stdout
    dp = subprocess.run(["dnsperf", "-h"], capture_output=True, text=True, check=False)
    dpv = re.search(r"Version ([\d.]+)", dp.stdout + dp.stderr)
    print()
    print(f"machine: nproc {os.cpu_count()}, {cpu}, Python {platform.python_version()}, "
          f"{ver.splitlines()[0]}, dnsperf {dpv.group(1) if dpv else '?'}; "
          f"medians of {args.reps} runs")
    print()
    print("| run | queries/s | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|")
    for k, (qps, p50, p99) in med.items():
        if k.startswith("throughput"):
            print(f"| {k} | {qps:.0f} | | |")
        else:
            print(f"| {k} (at {args.rate}/s) | | {p50:.3f} | {p99:.3f} |")
    for label, (c50, c99) in cost.items():
        print(f"| DnsStub.handle_query alone, {label} | | {c50 / 1000:.4f} | {c99 / 1000:.4f} |")
    d50, d99 = med["latency direct upstream"][1:]
    for who in ("dnsmasq (pass-through)", "fz (pass-through)"):
        p50, p99 = med[f"latency {who}"][1:]
        print(f"added latency {who}: p50 {p50 - d50:+.3f} ms, p99 {p99 - d99:+.3f} ms")
    ratio = med["throughput fz (pass-through)"][0] / med["throughput dnsmasq (pass-through)"][0]
    print(f"pass-through throughput fz / dnsmasq = {ratio:.2f}x (goal >= 1.0x)")
    print(f"resource answers p99 = {med['latency fz (resource names)'][2]:.3f} ms (goal < 1 ms)")


if __name__ == "__main__":
    main()
