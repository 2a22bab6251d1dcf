#!/usr/bin/env python3
"""Policy-decision benchmark: 100k users, 1k groups, 10k resources, 50k policies in SQLite.

Measures the decision latency (p50 / p99) in-process (store lookup of the candidate policies +
the pure engine) and through the REST API (`POST /api/v1/policies/explain` on a real
`fz portal serve`), and the peak memory of both processes. Goal from the issue: p99 < 1 ms
in-process. There is no external anchor for this one; the goal is the yardstick.

Usage: python bench/policy/run.py [--users 100000 --groups 1000 --resources 10000 --policies 50000]
       [--decisions 20000] [--api-decisions 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from firezone.portal.domain.policies import EvalContext  # noqa: E402
from firezone.roles.portal import open_store  # noqa: E402


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def populate(data_dir: Path, n_users: int, n_groups: int, n_resources: int, n_policies: int,
             rng: random.Random) -> tuple[str, str, list[str], list[str]]:
    store = open_store(data_dir)
    db = store.db
    acc = store.create_account("Bench", "bench")
    aid = acc["id"]
    admin = store.create_actor(aid, email="admin@bench.test", type="admin")
    _row, token = store.create_token(aid, type="api", actor=admin["id"])
    t = int(time.time() * 1000)
    site = store.create_site(aid, "bench-site")
    users = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(n_users)]
    groups = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(n_groups)]
    resources = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(n_resources)]
    with db.transaction():
        db.executemany("INSERT INTO actors (id, account_id, type, email, name, created_at) VALUES "
                       "(:id, :a, 'user', :e, :n, :t)",
                       [{"id": u, "a": aid, "e": f"user{i}@bench.test", "n": f"user {i}", "t": t + i}
                        for i, u in enumerate(users)])
        db.executemany("INSERT INTO groups (id, account_id, name, created_at) VALUES (:id, :a, :n, :t)",
                       [{"id": g, "a": aid, "n": f"group {i}", "t": t + i} for i, g in enumerate(groups)])
        members = []
        for u in users:  # every user in 3 groups
            for g in rng.sample(groups, 3):
                members.append({"a": aid, "g": g, "u": u, "t": t})
        db.executemany("INSERT INTO memberships (account_id, group_id, actor_id, created_at) VALUES (:a, :g, :u, :t)",
                       members)
        db.executemany("INSERT INTO resources (id, account_id, site_id, name, type, address, filters, created_at, "
                       "updated_at) VALUES (:id, :a, :s, :n, 'cidr', :ad, '[]', :t, :t)",
                       [{"id": r, "a": aid, "s": site["id"], "n": f"res-{i}", "ad": f"10.{i // 250}.{i % 250}.0/24",
                         "t": t + i} for i, r in enumerate(resources)])
        conds = [
            [],
            [{"property": "remote_ip", "operator": "is_in_cidr", "values": ["192.0.2.0/24", "198.51.100.0/24"]}],
            [{"property": "current_utc_datetime", "operator": "is_in_day_of_week_time_ranges",
              "values": ["M,T,W,R,F/08:00-18:00/Europe/Berlin"]}],
            [{"property": "client_verified", "operator": "is", "values": ["true"]}],
        ]
        db.executemany("INSERT INTO policies (id, account_id, group_id, resource_id, conditions, created_at) "
                       "VALUES (:id, :a, :g, :r, :c, :t)",
                       [{"id": str(uuid.UUID(int=rng.getrandbits(128))), "a": aid, "g": rng.choice(groups),
                         "r": rng.choice(resources), "c": json.dumps(rng.choice(conds)), "t": t + i}
                        for i in range(n_policies)])
    db.execute("ANALYZE")
    return aid, token, users, resources


def bench_in_process(data_dir: Path, users: list[str], resources: list[str], n: int,
                     rng: random.Random) -> dict[str, float]:
    store = open_store(data_dir)
    ctx = EvalContext(now=datetime.now(UTC), remote_ip="192.0.2.10", client_verified=True)
    pairs = [(rng.choice(users), rng.choice(resources)) for _ in range(n // 2)]
    # and as many pairs where the user is in a group some policy of the resource names
    matching = store.db.fetchall("SELECT m.actor_id, p.resource_id FROM policies p JOIN memberships m "
                                 "ON m.group_id = p.group_id ORDER BY random() LIMIT :n", {"n": n - len(pairs)})
    pairs += [(r["actor_id"], r["resource_id"]) for r in matching]
    rng.shuffle(pairs)
    for u, r in pairs[:500]:  # warm the page cache and the compiled-condition cache
        store.decide(u, r, ctx)
    lat = []
    allowed = 0
    for u, r in pairs:
        t0 = time.perf_counter()
        d = store.decide(u, r, ctx)
        lat.append(time.perf_counter() - t0)
        allowed += d.allowed
    return {"p50_ms": pct(lat, 0.5) * 1e3, "p99_ms": pct(lat, 0.99) * 1e3, "mean_ms": statistics.fmean(lat) * 1e3,
            "decisions": len(pairs), "allowed": allowed}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_api(data_dir: Path, token: str, n: int, rng: random.Random, n_users: int, n_resources: int) -> dict[str, float]:
    port = free_port()
    env = {**os.environ, "FIREZONE_CREDENTIALS": "file"}
    proc = subprocess.Popen([sys.executable, "-m", "firezone", "portal", "serve", "--data-dir", str(data_dir),
                             "--listen", f"127.0.0.1:{port}"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url + "/healthz", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        lat = []
        for i in range(n + 100):
            body = json.dumps({"user": f"user{rng.randrange(n_users)}@bench.test",
                               "resource": f"res-{rng.randrange(n_resources)}", "remote_ip": "192.0.2.10"})
            t0 = time.perf_counter()
            conn.request("POST", "/api/v1/policies/explain", body, headers)
            resp = conn.getresponse()
            resp.read()
            if i >= 100:
                lat.append(time.perf_counter() - t0)
            assert resp.status == 200, resp.status
        with open(f"/proc/{proc.pid}/status") as f:
            hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
        return {"p50_ms": pct(lat, 0.5) * 1e3, "p99_ms": pct(lat, 0.99) * 1e3, "decisions": n,
                "server_peak_rss_mib": hwm / 1024}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}, SQLite {__import__('sqlite3').sqlite_version}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--groups", type=int, default=1_000)
    ap.add_argument("--resources", type=int, default=10_000)
    ap.add_argument("--policies", type=int, default=50_000)
    ap.add_argument("--decisions", type=int, default=20_000)
    ap.add_argument("--api-decisions", type=int, default=2_000)
    args = ap.parse_args()
    rng = random.Random(7)
    with tempfile.TemporaryDirectory(prefix="fz-bench-policy-") as tmp:
        data_dir = Path(tmp)
        t0 = time.perf_counter()
        _aid, token, users, resources = populate(data_dir, args.users, args.groups, args.resources, args.policies, rng)
        build_s = time.perf_counter() - t0
        db_mib = (data_dir / "portal.db").stat().st_size / 2**20
        inproc = bench_in_process(data_dir, users, resources, args.decisions, rng)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        api = bench_api(data_dir, token, args.api_decisions, rng, args.users, args.resources)
    print(f"machine: {machine()}")
    print(f"data: {args.users} users, {args.groups} groups, {args.resources} resources, {args.policies} policies "
          f"(built in {build_s:.1f} s, database {db_mib:.0f} MiB)")
    print(f"in-process: p50 {inproc['p50_ms']:.3f} ms  p99 {inproc['p99_ms']:.3f} ms  mean {inproc['mean_ms']:.3f} ms "
          f"over {inproc['decisions']} decisions ({inproc['allowed']} allowed); peak RSS {peak:.0f} MiB")
    print(f"REST API (explain): p50 {api['p50_ms']:.2f} ms  p99 {api['p99_ms']:.2f} ms over {api['decisions']} "
          f"sequential requests; portal peak RSS {api['server_peak_rss_mib']:.0f} MiB")
    print(f"goal p99 < 1 ms in-process: {'met' if inproc['p99_ms'] < 1 else 'NOT met'}")


if __name__ == "__main__":
    main()
