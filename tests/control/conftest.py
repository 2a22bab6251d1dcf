"""A real portal process that tests can restart, and WebSocket peers that speak its channels."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import pytest

from tests.cli.conftest import FZ, free_port, isolated_env
from tests.portal_api import Api


@dataclass
class ControlPortal:
    root: Path
    port: int
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def start(self) -> None:
        log_path = self.root / f"portal-{len(self.logs)}.log"
        self.logs.append(log_path)
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen([*FZ, "-v", "portal", "serve", "--data-dir", str(self.data_dir),
                                          "--listen", f"127.0.0.1:{self.port}"], env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, log_path.read_text()
            try:
                urllib.request.urlopen(self.url + "/healthz", timeout=1).read()
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("portal did not become healthy")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def admin(self) -> Api:
        cred = Path(self.env["XDG_CONFIG_HOME"]) / "firezone" / "credentials" / "admin.json"
        return Api(self.url + "/api/v1", json.loads(cred.read_text())["token"])


@pytest.fixture
def control_portal(tmp_path: Path) -> Iterator[ControlPortal]:
    env = isolated_env(tmp_path / "user")
    env["FIREZONE_PORTAL_REEVALUATE_INTERVAL"] = "1"
    env["FIREZONE_PORTAL_AUTHORIZATION_TIMEOUT"] = "2"
    port = free_port()
    cp = ControlPortal(tmp_path, port, env)
    init = subprocess.run([*FZ, "portal", "init", "--data-dir", str(cp.data_dir), "--account", "acme",
                           "--admin-email", "admin@acme.test", "--url", cp.url], env=env, capture_output=True,
                          text=True, timeout=60)
    assert init.returncode == 0, init.stderr
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()
    text = cp.log_text()
    assert "Traceback" not in text, text
    assert '"level": "ERROR"' not in text, text


def random_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


class Peer:
    """One WebSocket session (client, gateway or relay), driven by the test."""

    def __init__(self, portal: ControlPortal, kind: str, token: str, **params: str) -> None:
        self.portal, self.kind, self.token = portal, kind, token
        self.params = {"external_id": str(uuid.uuid4()), "public_key": random_key(), "name": f"test-{kind}", **params}
        if kind == "relay":
            self.params = {"ipv4": "127.0.0.1", "port": "3478", **params}
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.inbox: list[dict[str, Any]] = []
        self._ref = 0

    async def connect(self) -> None:
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(f"ws://127.0.0.1:{self.portal.port}/{self.kind}",
                                                params=self.params, headers={"Authorization": f"Bearer {self.token}"})

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.session is not None:
            await self.session.close()

    async def send(self, event: str, payload: Any, topic: str | None = None) -> str:
        self._ref += 1
        ref = str(self._ref)
        assert self.ws is not None
        await self.ws.send_str(json.dumps({"topic": topic or self.kind, "event": event, "payload": payload, "ref": ref}))
        return ref

    async def recv(self, timeout: float = 5.0) -> dict[str, Any] | None:
        assert self.ws is not None
        msg = await self.ws.receive(timeout=timeout)
        if msg.type is not aiohttp.WSMsgType.TEXT:
            return None
        frame: dict[str, Any] = json.loads(msg.data)
        return frame

    async def expect(self, event: str, timeout: float = 5.0, **match: Any) -> dict[str, Any]:
        """The next frame with this event (and matching payload keys); earlier ones are kept."""
        for i, f in enumerate(self.inbox):
            if _matches(f, event, match):
                return self.inbox.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.kind}: no {event} {match} within {timeout}s; got {self.inbox}")
            try:
                f = await self.recv(left)
            except asyncio.TimeoutError:
                continue
            if f is None:
                raise AssertionError(f"{self.kind}: socket closed while waiting for {event}; got {self.inbox}")
            if _matches(f, event, match):
                return f
            self.inbox.append(f)

    async def expect_nothing(self, event: str, timeout: float) -> None:
        """Fail if a frame with this event arrives (or is already waiting) within ``timeout``."""
        try:
            f = await self.expect(event, timeout)
        except AssertionError:
            return
        raise AssertionError(f"{self.kind}: unexpected {event}: {f}")

    async def reply_for(self, ref: str, timeout: float = 5.0) -> dict[str, Any]:
        f = await self.expect("phx_reply", timeout, _ref=ref)
        return f["payload"]

    async def join(self, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        ref = await self.send("phx_join", payload or {})
        reply = await self.reply_for(ref)
        assert reply["status"] == "ok", reply
        if self.kind == "relay":
            return reply
        return (await self.expect("init"))["payload"]


def _matches(frame: dict[str, Any], event: str, match: dict[str, Any]) -> bool:
    if frame.get("event") != event:
        return False
    for k, v in match.items():
        if k == "_ref":
            if frame.get("ref") != v:
                return False
        elif not isinstance(frame.get("payload"), dict) or frame["payload"].get(k) != v:
            return False
    return True
