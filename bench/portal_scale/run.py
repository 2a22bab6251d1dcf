#!/usr/bin/env python3
"""Portal scale: N client sessions on real WebSockets against one `fz portal serve` process.

For each N: the portal's memory per session, its idle CPU while the sessions heartbeat, the time
to push one resource change to all N clients, and authorizations per second (clients request,
a simulated gateway acknowledges, clients receive `authorization_created`).
Goals from the issue: 10k sessions under 1 GiB, fan-out to 10k in < 2 s, >= 1,000 authorizations/s.

Usage: python bench/portal_scale/run.py [--sizes 1000,5000,10000] [--idle 20] [--authorizations 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
FZ = [sys.executable, "-m", "firezone"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def api(url: str, token: str, method: str, path: str, body: Any = None) -> Any:
    req = urllib.request.Request(url + "/api/v1" + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        text = r.read()
        return json.loads(text) if text else None


class Portal:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "HOME": str(root), "XDG_CONFIG_HOME": str(root / "cfg"),
                    "FIREZONE_CREDENTIALS": "file", "FIREZONE_PORTAL_AUTHORIZATION_TIMEOUT": "30"}
        subprocess.run([*FZ, "portal", "init", "--data-dir", str(root / "data"), "--account", "scale",
                        "--admin-email", "admin@scale.test", "--url", self.url], env=self.env, check=True,
                       capture_output=True)
        self.proc = subprocess.Popen([*FZ, "portal", "serve", "--data-dir", str(root / "data"), "--listen",
                                      f"127.0.0.1:{self.port}"], env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=open(root / "portal.log", "wb"))
        for _ in range(100):
            try:
                urllib.request.urlopen(self.url + "/healthz", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        self.token = json.loads((root / "cfg" / "firezone" / "credentials" / "admin.json").read_text())["token"]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


class Sim:
    """N client sessions and one gateway that acknowledges every authorization."""

    def __init__(self, url: str, client_token: str, gateway_token: str) -> None:
        self.ws_url = url.replace("http://", "ws://")
        self.client_token, self.gateway_token = client_token, gateway_token
        self.session: aiohttp.ClientSession | None = None
        self.clients: list[aiohttp.ClientWebSocketResponse] = []
        self.updates = 0
        self.update_target = 0
        self.update_done = asyncio.Event()
        self.authorized = 0
        self.auth_target = 0
        self.auth_done = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.closed = 0
        self.auth_failed = 0

    async def _open(self, kind: str, token: str) -> aiohttp.ClientWebSocketResponse:
        assert self.session is not None
        params = {"external_id": str(uuid.uuid4()), "public_key": base64.b64encode(os.urandom(32)).decode(),
                  "name": kind}
        ws = await self.session.ws_connect(f"{self.ws_url}/{kind}", params=params,
                                           headers={"Authorization": f"Bearer {token}"}, max_msg_size=1 << 22)
        await ws.send_str(json.dumps({"topic": kind, "event": "phx_join", "payload": {}, "ref": "1"}))
        while True:
            msg = json.loads((await ws.receive()).data)
            if msg["event"] == "init":
                return ws

    async def start(self, n: int) -> float:
        conn = aiohttp.TCPConnector(limit=0)
        self.session = aiohttp.ClientSession(connector=conn)
        gw = await self._open("gateway", self.gateway_token)
        self.gateway_ws = gw
        self.tasks.append(asyncio.create_task(self._gateway(gw)))
        t0 = time.perf_counter()
        sem = asyncio.Semaphore(200)

        async def one() -> None:
            async with sem:
                ws = await self._open("client", self.client_token)
                self.clients.append(ws)
                self.tasks.append(asyncio.create_task(self._client(ws)))

        self.tasks.append(asyncio.create_task(self._heartbeats()))
        await asyncio.gather(*(one() for _ in range(n)))
        return time.perf_counter() - t0

    async def _gateway(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            f = json.loads(msg.data)
            if f["event"] == "create_authorization":
                await ws.send_str(json.dumps({"topic": "gateway", "event": "authorization_created",
                                              "payload": {"ref": f["payload"]["ref"]}, "ref": None}))

    async def _client(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            await self._client_loop(ws)
        finally:
            self.closed += 1

    async def _client_loop(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            event = json.loads(msg.data)["event"]
            if event == "resource_created_or_updated":
                self.updates += 1
                if self.updates >= self.update_target:
                    self.update_done.set()
            elif event in ("authorization_created", "authorization_creation_failed"):
                self.authorized += 1
                if event == "authorization_creation_failed":
                    self.auth_failed += 1
                if self.authorized >= self.auth_target:
                    self.auth_done.set()

    async def _heartbeats(self) -> None:
        frame = json.dumps({"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": "hb"})
        while True:
            await asyncio.sleep(10)
            for ws in [self.gateway_ws, *self.clients]:
                if not ws.closed:
                    try:
                        await ws.send_str(frame)
                    except (ConnectionError, aiohttp.ClientError):
                        pass

    async def fan_out(self, change: Any) -> float:
        self.updates = 0
        self.update_target = len(self.clients)
        self.update_done.clear()
        t0 = time.perf_counter()
        await asyncio.to_thread(change)
        await asyncio.wait_for(self.update_done.wait(), 120)
        return time.perf_counter() - t0

    async def authorize(self, total: int, resource_id: str) -> float:
        self.authorized = 0
        self.auth_target = total
        self.auth_done.clear()
        t0 = time.perf_counter()
        per = max(1, total // len(self.clients))
        sent = 0
        for i in range(total):
            ws = self.clients[(i // per) % len(self.clients)]
            await ws.send_str(json.dumps({"topic": "client", "event": "request_authorization",
                                          "payload": {"resource_id": resource_id, "connected_gateway_ids": []},
                                          "ref": str(i)}))
            sent += 1
        await asyncio.wait_for(self.auth_done.wait(), 300)
        return total / (time.perf_counter() - t0)

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        for ws in self.clients:
            await ws.close()
        if self.session:
            await self.session.close()


async def measure(n: int, idle_s: float, n_auth: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="fz-bench-scale-") as tmp:
        portal = Portal(Path(tmp))
        try:
            url, tok = portal.url, portal.token
            api(url, tok, "POST", "/sites", {"name": "S"})
            res = api(url, tok, "POST", "/resources", {"name": "r", "site": "S", "address": "10.0.0.1"})["data"]
            api(url, tok, "POST", "/users", {"email": "u@scale.test"})
            api(url, tok, "POST", "/policies", {"group": "Everyone", "resource": "r"})
            ctok = api(url, tok, "POST", "/tokens", {"type": "client", "user": "u@scale.test"})["secret"]
            gtok = api(url, tok, "POST", "/tokens", {"type": "gateway", "site": "S"})["secret"]
            rss0 = proc_status(portal.proc.pid, "VmRSS")
            sim = Sim(url, ctok, gtok)
            connect_s = await sim.start(n)
            await asyncio.sleep(2)
            rss1 = proc_status(portal.proc.pid, "VmRSS")
            c0 = cpu_seconds(portal.proc.pid)
            await asyncio.sleep(idle_s)
            idle_cpu = (cpu_seconds(portal.proc.pid) - c0) / idle_s
            fan = await sim.fan_out(lambda: api(url, tok, "PATCH", "/resources/r",
                                                {"address_description": f"changed {time.time()}"}))
            rate = await sim.authorize(min(n_auth, 20 * n), res["id"])
            failed, dropped = sim.auth_failed, sim.closed
            hwm = proc_status(portal.proc.pid, "VmHWM")
            await sim.close()
        finally:
            portal.stop()
    return {"n": n, "connect_s": connect_s, "rss_mib": rss1 / 1024, "per_session_kib": (rss1 - rss0) / n,
            "peak_mib": hwm / 1024, "idle_cpu_pct": idle_cpu * 100, "fanout_s": fan, "authz_per_s": rate,
            "authz_failed": failed, "sessions_dropped": dropped}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,5000,10000")
    ap.add_argument("--idle", type=float, default=20.0, help="seconds of idle sessions to measure CPU over")
    ap.add_argument("--authorizations", type=int, default=5000)
    args = ap.parse_args()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"machine: {os.cpu_count()} cores, {cpu}, Python {platform.python_version()}, aiohttp {aiohttp.__version__}")
    print(f"{'sessions':>8} {'connect s':>9} {'RSS MiB':>8} {'KiB/sess':>8} {'idle CPU':>8} {'fan-out s':>9} "
          f"{'authz/s':>8} {'failed':>6} {'dropped':>7}")
    for n in (int(x) for x in args.sizes.split(",")):
        r = uvloop.run(measure(n, args.idle, args.authorizations))
        print(f"{r['n']:>8} {r['connect_s']:>9.1f} {r['rss_mib']:>8.0f} {r['per_session_kib']:>8.1f} "
              f"{r['idle_cpu_pct']:>7.1f}% {r['fanout_s']:>9.2f} {r['authz_per_s']:>8.0f} {r['authz_failed']:>6} "
              f"{r['sessions_dropped']:>7}", flush=True)


if __name__ == "__main__":
    main()
