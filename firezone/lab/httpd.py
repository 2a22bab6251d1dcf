"""The lab's HTTP server for the resource hosts (``python -m firezone.lab.httpd``).

``GET /`` answers with the name of the host whose address the request reached (``http``,
``dns-host``, ``download``, ...), ``GET /ip`` with the client address as seen by the server,
``GET /bytes/N`` with N deterministic bytes and their SHA-256 in the ``X-Sha256`` header. It
listens on every address of its namespace, IPv4 and IPv6, on each port given.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import ipaddress
import logging
import random
import socket

from aiohttp import web

from firezone.lab import topology as topo

log = logging.getLogger(__name__)

MAX_BYTES = 256 * 1024 * 1024
_SEED = 0x667A6C6162  # "fzlab"
_CHUNK = 1 << 16


def payload(n: int) -> bytes:
    """The body of ``/bytes/n``: the first n bytes of one fixed pseudo-random stream."""
    rng = random.Random(_SEED)
    out = bytearray()
    while len(out) < n:
        out += rng.randbytes(_CHUNK)
    return bytes(out[:n])


@functools.lru_cache(maxsize=4)
def _payload_and_digest(n: int) -> tuple[bytes, str]:
    body = payload(n)
    return body, hashlib.sha256(body).hexdigest()


def payload_sha256(n: int) -> str:
    """SHA-256 (hex) of ``payload(n)``, what ``/bytes/n`` sends as ``X-Sha256``."""
    return _payload_and_digest(n)[1]


def _plain(addr: str) -> str:
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def make_app(names: dict[str, str]) -> web.Application:
    async def index(request: web.Request) -> web.Response:
        sock = request.transport.get_extra_info("sockname") if request.transport else None
        local = _plain(sock[0]) if sock else ""
        return web.Response(text=names.get(local, socket.gethostname()) + "\n")

    async def ip(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        return web.Response(text=(_plain(peer[0]) if peer else "") + "\n")

    async def bytes_(request: web.Request) -> web.Response:
        try:
            n = int(request.match_info["n"])
        except ValueError:
            raise web.HTTPBadRequest(text="N must be an integer\n") from None
        if not 0 <= n <= MAX_BYTES:
            raise web.HTTPBadRequest(text=f"N must be between 0 and {MAX_BYTES}\n")
        body, digest = await asyncio.to_thread(_payload_and_digest, n)
        return web.Response(body=body, content_type="application/octet-stream",
                            headers={"X-Sha256": digest})

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/ip", ip)
    app.router.add_get("/bytes/{n}", bytes_)
    return app


def _listen(family: socket.AddressFamily, port: int) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind(("::", port))
    else:
        s.bind(("0.0.0.0", port))
    s.listen(128)
    s.setblocking(False)
    return s


async def serve(ports: list[int]) -> None:
    runner = web.AppRunner(make_app(topo.hostnames_by_address()))
    await runner.setup()
    for port in ports:
        for fam in (socket.AF_INET, socket.AF_INET6):
            await web.SockSite(runner, _listen(fam, port)).start()
    log.info("lab httpd listening", extra={"ports": ports})
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m firezone.lab.httpd", description=__doc__)
    ap.add_argument("--ports", default="80,8080", help="comma-separated TCP ports (default 80,8080)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        import uvloop

        uvloop.run(serve([int(p) for p in args.ports.split(",")]))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
