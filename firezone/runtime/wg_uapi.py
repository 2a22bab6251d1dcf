"""The WireGuard cross-platform UAPI (``get=1``) over a UNIX socket, server and client side.

Speaking the same text protocol as wireguard-go lets ``wg show IFACE`` from wireguard-tools read an
fz interface when its socket is reachable as ``/run/wireguard/IFACE.sock``. Only ``get`` is served;
``set`` answers ``errno=1`` (configuration comes from the file given to ``fz wg up``).

Protocol (https://www.wireguard.com/xplatform/): the client writes ``get=1\\n\\n``; the server
answers ``key=value`` lines (interface keys, then per peer starting at ``public_key=``), ending
with ``errno=0`` and an empty line. Keys are lowercase hex.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

RUN_DIR = Path("/run/firezone/wg")
WG_TOOLS_DIR = Path("/run/wireguard")


@dataclass
class PeerInfo:
    public_key: bytes
    preshared_key: bytes | None = None
    endpoint: tuple[str, int] | None = None
    last_handshake_unix: float | None = None
    rx_bytes: int = 0
    tx_bytes: int = 0
    persistent_keepalive: int | None = None
    allowed_ips: list[str] = field(default_factory=list)


@dataclass
class InterfaceInfo:
    private_key: bytes | None
    public_key: bytes | None
    listen_port: int | None
    fwmark: int = 0
    peers: list[PeerInfo] = field(default_factory=list)


def format_endpoint(ep: tuple[str, int]) -> str:
    host, port = ep[0], ep[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def render_get(info: InterfaceInfo) -> str:
    """The reply to ``get=1`` for ``info`` (including the final ``errno=0`` and blank line)."""
    out: list[str] = []
    if info.private_key is not None:
        out.append(f"private_key={info.private_key.hex()}")
    if info.listen_port is not None:
        out.append(f"listen_port={info.listen_port}")
    if info.fwmark:
        out.append(f"fwmark={info.fwmark}")
    for p in info.peers:
        out.append(f"public_key={p.public_key.hex()}")
        out.append(f"preshared_key={(p.preshared_key or bytes(32)).hex()}")
        out.append("protocol_version=1")
        if p.endpoint is not None:
            out.append(f"endpoint={format_endpoint(p.endpoint)}")
        hs = p.last_handshake_unix or 0.0
        sec = int(hs)
        out.append(f"last_handshake_time_sec={sec}")
        out.append(f"last_handshake_time_nsec={int((hs - sec) * 1e9) if hs else 0}")
        out.append(f"tx_bytes={p.tx_bytes}")
        out.append(f"rx_bytes={p.rx_bytes}")
        out.append(f"persistent_keepalive_interval={p.persistent_keepalive or 0}")
        out.extend(f"allowed_ip={a}" for a in p.allowed_ips)
    out.append("errno=0")
    return "\n".join(out) + "\n\n"


def parse_get(text: str) -> InterfaceInfo:
    """Parse a ``get=1`` reply (from fz or wireguard-go); raises ValueError on ``errno!=0``."""
    info = InterfaceInfo(private_key=None, public_key=None, listen_port=None)
    peer: PeerInfo | None = None
    for line in text.splitlines():
        if not line:
            break
        key, _, value = line.partition("=")
        if key == "errno":
            if value != "0":
                raise ValueError(f"interface answered errno={value}")
        elif key == "public_key":
            peer = PeerInfo(public_key=bytes.fromhex(value))
            info.peers.append(peer)
        elif peer is None:
            if key == "private_key":
                info.private_key = bytes.fromhex(value)
            elif key == "listen_port":
                info.listen_port = int(value)
            elif key == "fwmark":
                info.fwmark = int(value)
        elif key == "preshared_key":
            raw = bytes.fromhex(value)
            peer.preshared_key = raw if any(raw) else None
        elif key == "endpoint":
            host, _, port = value.rpartition(":")
            peer.endpoint = (host.strip("[]"), int(port))
        elif key == "last_handshake_time_sec":
            peer.last_handshake_unix = (peer.last_handshake_unix or 0.0) + int(value)
        elif key == "last_handshake_time_nsec":
            peer.last_handshake_unix = (peer.last_handshake_unix or 0.0) + int(value) / 1e9
        elif key == "rx_bytes":
            peer.rx_bytes = int(value)
        elif key == "tx_bytes":
            peer.tx_bytes = int(value)
        elif key == "persistent_keepalive_interval":
            peer.persistent_keepalive = int(value) or None
        elif key == "allowed_ip":
            peer.allowed_ips.append(value)
    for p in info.peers:
        if not p.last_handshake_unix:
            p.last_handshake_unix = None
    return info


def socket_path(iface: str, run_dir: Path = RUN_DIR) -> Path:
    return run_dir / f"{iface}.sock"


class UapiServer:
    """Serves ``get=1`` for one interface at ``run_dir/IFACE.sock`` (mode 0600)."""

    def __init__(self, iface: str, snapshot: Callable[[], InterfaceInfo], *,
                 run_dir: Path = RUN_DIR, link_for_wg_tools: bool = True) -> None:
        self.iface = iface
        self.path = socket_path(iface, run_dir)
        self._snapshot = snapshot
        self._server: asyncio.AbstractServer | None = None
        self._link = WG_TOOLS_DIR / f"{iface}.sock" if link_for_wg_tools else None
        self._linked = False

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.path.exists():
            if _alive(self.path):
                raise OSError(errno.EADDRINUSE, f"{self.path} is in use by a running interface")
            self.path.unlink()
        old = os.umask(0o077)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        finally:
            os.umask(old)
        if self._link is not None:
            try:
                WG_TOOLS_DIR.mkdir(parents=True, exist_ok=True, mode=0o755)
                if self._link.is_symlink() or not self._link.exists():
                    with contextlib.suppress(FileNotFoundError):
                        self._link.unlink()
                    self._link.symlink_to(self.path)
                    self._linked = True
            except OSError as e:
                log.debug("no wg-tools socket link", extra={"error": str(e)})

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                cmd = line.decode(errors="replace").strip()
                # the request ends with an empty line
                while await reader.readline() not in (b"\n", b""):
                    pass
                if cmd == "get=1":
                    writer.write(render_get(self._snapshot()).encode())
                else:
                    writer.write(b"errno=1\n\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if self._linked and self._link is not None:
            with contextlib.suppress(OSError):
                if self._link.is_symlink() and os.readlink(self._link) == str(self.path):
                    self._link.unlink()


def _alive(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def query(path: Path, timeout: float = 3.0) -> InterfaceInfo:
    """Blocking client: send ``get=1`` to the socket at ``path`` and parse the reply."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
        s.sendall(b"get=1\n\n")
        buf = b""
        while not buf.endswith(b"\n\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    finally:
        s.close()
    return parse_get(buf.decode())


def list_interfaces(run_dir: Path = RUN_DIR) -> list[str]:
    """Names of interfaces with a live socket in ``run_dir``."""
    if not run_dir.is_dir():
        return []
    return sorted(p.stem for p in run_dir.glob("*.sock") if _alive(p))
