#!/usr/bin/env python3
"""Pure policy-engine and DNS-pattern micro-benchmark (no store, no I/O).

Measures, in one run:
- ``policies.evaluate`` latency per decision for typical candidate sets (p50 / p99), with the
  compiled-condition cache warm, next to the same decisions with the cache cleared before each
  one (what a decision would cost if conditions were parsed every time);
- DNS-name lookups in a ``PatternTable`` of N patterns next to a linear ``best_match`` scan over
  the same patterns (the naive way).

There is no external anchor: the goal (p99 < 1 ms per decision) is the yardstick, and the
uncached / linear variants show what the caching and indexing buy. Wall-clock p99 on a busy
machine mostly measures preemption, so the thread CPU-time p99 is printed next to it.

Usage: python bench/policy_engine/run.py [--decisions 50000] [--patterns 10000]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from firezone.portal.domain import policies
from firezone.portal.domain.policies import EvalContext, PolicyInput, evaluate
from firezone.proto.dns.patterns import PatternTable, best_match, compile_pattern

CONDITION_SETS: list[list[dict[str, object]]] = [
    [],
    [
        {
            "property": "remote_ip",
            "operator": "is_in_cidr",
            "values": ["192.0.2.0/24", "198.51.100.0/24"],
        }
    ],
    [
        {
            "property": "current_utc_datetime",
            "operator": "is_in_day_of_week_time_ranges",
            "values": ["M-F/08:00-18:00/Europe/Berlin", "S/10:00-14:00/America/New_York"],
        }
    ],
    [{"property": "client_verified", "operator": "is", "values": ["true"]}],
    [
        {"property": "provider_id", "operator": "is_in", "values": ["prov-a", "prov-b"]},
        {"property": "remote_ip", "operator": "is_not_in_cidr", "values": ["10.0.0.0/8"]},
    ],
]


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def bench_evaluate(
    n: int, candidates: int, rng: random.Random, cached: bool
) -> tuple[float, float]:
    # 50k distinct policies, as many as the store holds; each decision sees a few of them.
    pool = [
        PolicyInput(f"p{i}", f"g{i % 1000}", f"r{i % 10000}", tuple(CONDITION_SETS[i % 5]))  # type: ignore[arg-type]
        for i in range(50_000)
    ]
    base = datetime(2026, 3, 20, tzinfo=UTC)
    lat: list[float] = []
    cpu: list[float] = []
    for i in range(n):
        cands = rng.sample(pool, candidates)
        ctx = EvalContext(
            now=base + timedelta(seconds=rng.randrange(30 * 86400)),
            remote_ip=rng.choice(["192.0.2.10", "203.0.113.5", "10.1.2.3"]),
            provider_id=rng.choice(["prov-a", "prov-c"]),
            client_verified=rng.random() < 0.5,
            token_expires_at=base + timedelta(days=40),
        )
        if not cached:
            policies._compiled_cache.clear()
        c0 = time.thread_time()
        t0 = time.perf_counter()
        evaluate(cands, ctx)
        t1 = time.perf_counter()
        c1 = time.thread_time()
        if i >= 200 or not cached:
            lat.append(t1 - t0)
            cpu.append(c1 - c0)
    return pct(lat, 0.5) * 1e3, pct(lat, 0.99) * 1e3, pct(cpu, 0.99) * 1e3


def bench_patterns(n: int, rng: random.Random) -> tuple[float, float, float]:
    texts = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            texts.append(f"host{i}.corp.example.com")
        elif kind == 1:
            texts.append(f"*.svc{i}.example.com")
        elif kind == 2:
            texts.append(f"**.zone{i}.internal")
        else:
            texts.append(f"web-?{i}.eu.example.com")
    compiled = [(compile_pattern(t), t) for t in texts]
    table: PatternTable[str] = PatternTable()
    for p, v in compiled:
        table.insert(p, v)
    names = [
        f"host{rng.randrange(n)}.corp.example.com"
        if j % 3 == 0
        else f"a.svc{rng.randrange(n)}.example.com"
        if j % 3 == 1
        else f"x.y.nothing{j}.example.org"
        for j in range(3000)
    ]
    lat = []
    for name in names:
        t0 = time.perf_counter()
        table.lookup(name)
        lat.append(time.perf_counter() - t0)
    scan = []
    for name in names[:60]:
        t0 = time.perf_counter()
        best_match(name, compiled)
        scan.append(time.perf_counter() - t0)
    return pct(lat, 0.5) * 1e6, pct(lat, 0.99) * 1e6, pct(scan, 0.5) * 1e6


def machine() -> str:
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decisions", type=int, default=50_000)
    ap.add_argument("--patterns", type=int, default=10_000)
    args = ap.parse_args()
    rng = random.Random(5)
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f}")
    for k in (1, 5, 20):
        p50, p99, c99 = bench_evaluate(args.decisions, k, rng, cached=True)
        u50, u99, uc99 = bench_evaluate(max(2000, args.decisions // 20), k, rng, cached=False)
        print(
            f"evaluate, {k:2d} candidates: p50 {p50:.4f} ms  p99 {p99:.4f} ms "
            f"(CPU p99 {c99:.4f} ms)  | uncached p50 {u50:.4f} ms  p99 {u99:.4f} ms "
            f"(CPU p99 {uc99:.4f} ms)  | median ratio {u50 / p50:.1f}x"
        )
    t50, t99, s50 = bench_patterns(args.patterns, rng)
    print(
        f"DNS lookup, {args.patterns} patterns: PatternTable p50 {t50:.2f} us  p99 {t99:.2f} us  "
        f"| linear best_match p50 {s50:.0f} us  | ratio {s50 / t50:.0f}x"
    )


if __name__ == "__main__":
    main()
