"""The asyncio WebSocket driver around :class:`firezone.proto.phoenix.PhoenixChannel`.

It owns the aiohttp session and the socket; every decision (when to connect, join, heartbeat,
back off, give up) is the state machine's.
"""

from __future__ import annotations

import asyncio
import logging
import platform
from typing import Any, Awaitable, Callable
from urllib.parse import urlencode, urlsplit, urlunsplit

import aiohttp

from firezone import __version__
from firezone.proto import phoenix
from firezone.runtime import full_tunnel
from firezone.runtime.rng import SYSTEM_RNG

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 15.0
MAX_FRAME = 1 << 20


def websocket_url(portal: str, path: str, params: dict[str, Any]) -> str:
    """``http://host:8080`` + ``/client`` -> ``ws://host:8080/client?...``."""
    parts = urlsplit(portal if "://" in portal else f"http://{portal}")
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None:
        raise ValueError(f"portal URL {portal!r}: scheme must be http, https, ws or wss")
    base = parts.path.rstrip("/")
    query = urlencode({k: v for k, v in params.items() if v is not None})
    return urlunsplit((scheme, parts.netloc, f"{base}{path}", query, ""))


def user_agent(component: str) -> str:
    return f"{platform.system()}/{platform.release()} {component}/{__version__} ({platform.machine()})"


EventHandler = Callable[[phoenix.ChannelEvent], Awaitable[None] | None]


class PortalConnection:
    def __init__(self, portal: str, path: str, token: str, *, topic: str, params: dict[str, Any] | None = None,
                 join_payload: dict[str, Any] | None = None, component: str = "fz",
                 max_partition_time: float | None = None, mark: bool = False) -> None:
        """``mark``: connect over a socket with fz's firewall mark, so the session stays outside
        a full tunnel (see :mod:`firezone.runtime.full_tunnel`)."""
        self.url = websocket_url(portal, path, params or {})
        self._mark = mark
        self._token = token
        self._component = component
        loop = asyncio.get_event_loop()
        self.channel = phoenix.PhoenixChannel(topic, join_payload or {}, SYSTEM_RNG, loop.time(),
                                              max_partition_time=max_partition_time)
        self._wake = asyncio.Event()
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._session: aiohttp.ClientSession | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self.stopped_reason: str | None = None

    # -- API for the role -----------------------------------------------------------------------

    def send(self, event: str, payload: Any) -> str:
        ref = self.channel.send(event, payload)
        self._wake.set()
        return ref

    def reconnect(self, reason: str = "reconnect requested") -> None:
        self.channel.reconnect(asyncio.get_event_loop().time(), reason)
        self._wake.set()

    def stop(self, reason: str = "stopped") -> None:
        self.channel.stop(asyncio.get_event_loop().time(), reason)
        self._wake.set()

    @property
    def joined(self) -> bool:
        return self.channel.state is phoenix.State.JOINED

    async def run(self, on_event: EventHandler) -> str:
        """Drive the channel until it stops; returns why it stopped."""
        loop = asyncio.get_running_loop()
        connector = None
        if self._mark:
            connector = aiohttp.TCPConnector(
                socket_factory=lambda ai: full_tunnel.marked_socket(ai[0], ai[1], ai[2]))
        self._session = aiohttp.ClientSession(headers={"User-Agent": user_agent(self._component)},
                                              connector=connector)
        try:
            while True:
                now = loop.time()
                self.channel.handle_timeout(now)
                await self._drain(on_event)
                if self.channel.state is phoenix.State.STOPPED:
                    return self.stopped_reason or "stopped"
                deadline = self.channel.poll_timeout()
                timeout = None if deadline is None else max(0.0, deadline - loop.time())
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
        finally:
            await self._teardown()
            await self._session.close()

    # -- internals ------------------------------------------------------------------------------

    async def _drain(self, on_event: EventHandler) -> None:
        while True:
            progressed = False
            while (action := self.channel.poll_action()) is not None:
                progressed = True
                if isinstance(action, phoenix.Connect):
                    self._connecting = asyncio.create_task(self._connect())
                else:
                    log.debug("closing portal connection", extra={"reason": action.reason})
                    await self._teardown()
            while (frame := self.channel.poll_transmit()) is not None:
                progressed = True
                if self._ws is not None and not self._ws.closed:
                    try:
                        await self._ws.send_str(frame)
                    except (ConnectionError, RuntimeError, aiohttp.ClientError) as e:
                        self.channel.handle_closed(asyncio.get_running_loop().time(), f"send failed: {e}")
            while (event := self.channel.poll_event()) is not None:
                progressed = True
                if isinstance(event, phoenix.Stopped):
                    self.stopped_reason = event.reason
                elif isinstance(event, phoenix.Disconnected):
                    log.info("portal connection lost; reconnecting",
                             extra={"reason": event.reason, "retry_in_s": round(event.retry_in, 2)})
                elif isinstance(event, phoenix.Joined):
                    log.info("connected to the portal", extra={"url": self.url.split("?")[0]})
                result = on_event(event)
                if asyncio.iscoroutine(result):
                    await result
            if not progressed:
                return

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._session is not None
        try:
            ws = await asyncio.wait_for(self._session.ws_connect(
                self.url, headers={"Authorization": f"Bearer {self._token}"}, max_msg_size=MAX_FRAME,
                timeout=aiohttp.ClientWSTimeout(ws_close=5.0), compress=0), CONNECT_TIMEOUT)
        except aiohttp.WSServerHandshakeError as e:
            retry_after = _retry_after(e.headers)
            self.channel.handle_connect_failed(loop.time(), status=e.status, reason=e.message, retry_after=retry_after)
            self._wake.set()
            return
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            self.channel.handle_connect_failed(loop.time(), reason=f"{type(e).__name__}: {e}")
            self._wake.set()
            return
        self._ws = ws
        self.channel.handle_connected(loop.time())
        self._reader = asyncio.create_task(self._read(ws))
        self._wake.set()

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        loop = asyncio.get_running_loop()
        reason = "closed by the portal"
        try:
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    self.channel.handle_text(msg.data, loop.time())
                    self._wake.set()
                elif msg.type is aiohttp.WSMsgType.ERROR:
                    reason = f"websocket error: {ws.exception()}"
                    break
        except (ConnectionError, aiohttp.ClientError) as e:
            reason = f"{type(e).__name__}: {e}"
        if self._ws is ws:
            self._ws = None
            self.channel.handle_closed(loop.time(), reason)
            self._wake.set()

    async def _teardown(self) -> None:
        ws, self._ws = self._ws, None
        for task in (self._connecting, self._reader):
            if task is not None and not task.done() and task is not asyncio.current_task():
                task.cancel()
        if ws is not None and not ws.closed:
            try:
                await asyncio.wait_for(ws.close(), 2.0)
            except (asyncio.TimeoutError, ConnectionError, aiohttp.ClientError):
                pass


def _retry_after(headers: Any) -> float | None:
    if not headers:
        return None
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
