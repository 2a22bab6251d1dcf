"""A small HTTP server for liveness, readiness and Prometheus metrics.

Every long-running role (relay, gateway, client) can serve it::

    health = HealthServer("127.0.0.1", 8080, registry=registry, ready=lambda: joined)
    host, port = await health.start()
    ...
    await health.stop()

``/healthz`` answers 200 while the process is alive (and ``live()`` holds), ``/readyz`` answers 200
only while ``ready()`` holds (503 otherwise), ``/metrics`` renders ``registry`` in the Prometheus
text format. Nothing here is on a packet path: metric values are read at scrape time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)


def _always() -> bool:
    return True


class HealthServer:
    """Serve ``/healthz``, ``/readyz`` and ``/metrics`` on one HOST:PORT."""

    def __init__(self, host: str, port: int, *, registry: CollectorRegistry,
                 ready: Callable[[], bool] = _always, live: Callable[[], bool] = _always) -> None:
        self.host = host
        self.port = port
        self.registry = registry
        self._ready = ready
        self._live = live
        self._runner: web.AppRunner | None = None
        self.bound: tuple[str, int] | None = None

    def app(self) -> web.Application:
        """The aiohttp application (exposed for tests that use aiohttp's test client)."""
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def start(self) -> tuple[str, int]:
        """Start listening; return the bound address (useful with port 0)."""
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        # aiohttp offers no public accessor for the bound socket (needed with port 0).
        server: Any = site._server
        sock = server.sockets[0] if server is not None and server.sockets else None
        if sock is not None:
            name = sock.getsockname()
            self.bound = (name[0], name[1])
        else:
            self.bound = (self.host, self.port)
        log.info("health server listening", extra={"port": self.bound[1]})
        log.debug("health server address", extra={"addr": f"{self.bound[0]}:{self.bound[1]}"})
        return self.bound

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, _request: web.Request) -> web.Response:
        if self._live():
            return web.Response(text="ok\n")
        return web.Response(status=503, text="unhealthy\n")

    async def _readyz(self, _request: web.Request) -> web.Response:
        if self._ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
