"""The client's status socket: one JSON line in, one out; stale sockets replaced, live ones kept."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from firezone.runtime.control_socket import ControlServer, ControlSocketError, query


def _handler(req: dict[str, Any]) -> dict[str, Any]:
    if req.get("cmd") == "status":
        return {"resources": [], "seen": req}
    return {"error": f"unknown command {req.get('cmd')!r}"}


def test_round_trip_and_unknown_command(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"

    async def main() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        server = ControlServer(path, _handler)
        await server.start()
        try:
            status = await asyncio.to_thread(query, path, {"cmd": "status"})
            unknown = await asyncio.to_thread(query, path, {"cmd": "nope"})
            ping = await asyncio.to_thread(query, path, {"cmd": "ping"})
        finally:
            server.close()
        return status, unknown, ping

    status, unknown, ping = asyncio.run(main())
    assert status == {"resources": [], "seen": {"cmd": "status"}}
    assert unknown == {"error": "unknown command 'nope'"}
    assert ping == {"ok": True}
    assert not path.exists()


def test_no_server_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ControlSocketError, match="no fz client is running"):
        query(tmp_path / "missing.sock", {"cmd": "status"})


def test_stale_socket_file_is_replaced_but_a_live_server_is_not(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "c.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a crashed client leaves

    async def main() -> None:
        first = ControlServer(path, _handler)
        await first.start()
        try:
            second = ControlServer(path, _handler)
            with pytest.raises(ControlSocketError, match="another fz client is running"):
                await second.start()
        finally:
            first.close()

    asyncio.run(main())
