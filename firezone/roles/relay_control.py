"""The relay's portal control side: join the portal's ``/relay`` channel with the relay's secret.

The relay serves only after the portal answered the join and pushed ``init``; the portal derives
every client's and gateway's TURN credentials from the same secret. If the portal goes away the
relay keeps serving (credentials already handed out stay valid) while the channel reconnects; a
refused token (401/403) or a ``disconnect`` stops the relay.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from firezone.proto import phoenix
from firezone.roles.relay import Control, RelayError
from firezone.runtime.portal_ws import PortalConnection

log = logging.getLogger(__name__)

JOIN_TIMEOUT = 30.0


class PortalControl(Control):
    def __init__(self, portal: str, token: str, *, ipv4: str | None, ipv6: str | None, port: int,
                 name: str | None = None) -> None:
        self.portal, self.token = portal, token
        self.params: dict[str, Any] = {"ipv4": ipv4, "ipv6": ipv6, "port": port, "name": name}
        self._conn: PortalConnection | None = None
        self._task: asyncio.Task[str] | None = None
        self._accepted = asyncio.Event()
        self._stopped: str | None = None

    def _on_event(self, event: phoenix.ChannelEvent) -> None:
        if isinstance(event, phoenix.Message) and event.event == "init":
            if not self._accepted.is_set():
                log.info("the portal accepted the relay")
            self._accepted.set()
        elif isinstance(event, phoenix.Stopped):
            self._stopped = event.reason
            self._accepted.set()

    async def join(self, secret: bytes) -> None:
        self._conn = PortalConnection(self.portal, "/relay", self.token, topic="relay", params=self.params,
                                      join_payload={"stamp_secret": secret.hex()}, component="fz-relay")
        self._task = asyncio.create_task(self._conn.run(self._on_event))
        try:
            await asyncio.wait_for(self._accepted.wait(), JOIN_TIMEOUT)
        except asyncio.TimeoutError:
            await self.leave()
            raise RelayError(f"the portal at {self.portal} did not accept the relay within "
                             f"{JOIN_TIMEOUT:.0f} s") from None
        if self._stopped is not None:
            await self.leave()
            raise RelayError(f"the portal refused the relay: {self._stopped}")

    async def run(self) -> None:
        assert self._task is not None
        reason = await self._task
        log.warning("left the portal; the relay stops", extra={"reason": reason})

    async def leave(self) -> None:
        if self._conn is not None:
            self._conn.stop("relay shutting down")
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 5.0)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._task.cancel()
