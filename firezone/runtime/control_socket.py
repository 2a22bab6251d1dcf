"""The local status socket of a running ``fz client up``: one JSON request line, one JSON answer line.

Requests are ``{"cmd": "status"}`` (or ``"resources"``); the server answers with the handler's dict
(``{"error": ...}`` for an unknown command). The socket is 0660 root-owned: only root (and the
socket's group) may ask. :func:`query` is the blocking client used by ``fz client status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_PATH = Path("/run/firezone/client.sock")
MAX_REQUEST = 65536

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlSocketError(OSError):
    """Nothing answers on the socket (no ``fz client up`` running) or the answer is unreadable."""


def default_path() -> Path:
    """``FIREZONE_CONTROL_SOCKET`` or /run/firezone/client.sock."""
    env = os.environ.get("FIREZONE_CONTROL_SOCKET")
    return Path(env) if env else DEFAULT_PATH


class ControlServer:
    """Serves ``handler`` on a UNIX stream socket until :meth:`close`."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if self.path.exists() or self.path.is_symlink():
            # A live server answers; a stale socket file from a crash is replaced.
            try:
                await asyncio.to_thread(query, self.path, {"cmd": "ping"}, 1.0)
            except ControlSocketError:
                self.path.unlink(missing_ok=True)
            else:
                raise ControlSocketError(f"another fz client is running (it answers on {self.path})")
        old = os.umask(0o117)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        finally:
            os.umask(old)
        log.debug("control socket listening", extra={"path": str(self.path)})

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            try:
                req = json.loads(line[:MAX_REQUEST] or b"{}")
                if not isinstance(req, dict):
                    raise TypeError("not an object")
                answer = {"ok": True} if req.get("cmd") == "ping" else self.handler(req)
            except (ValueError, TypeError) as e:
                answer = {"error": f"bad request: {e}"}
            writer.write(json.dumps(answer, default=str).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
            self.path.unlink(missing_ok=True)


def query(path: Path, request: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Send one request to a running client and return its answer."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(json.dumps(request).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
    except FileNotFoundError:
        raise ControlSocketError(f"no fz client is running (no socket {path})") from None
    except OSError as e:
        raise ControlSocketError(f"cannot talk to the fz client at {path}: {e.strerror or e}") from None
    try:
        answer = json.loads(buf)
    except ValueError:
        raise ControlSocketError(f"unreadable answer from {path}") from None
    if not isinstance(answer, dict):
        raise ControlSocketError(f"unreadable answer from {path}")
    return answer
