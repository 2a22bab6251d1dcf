"""fz's own sockets carry its firewall mark (the full tunnel's routing rule skips them)."""

from __future__ import annotations

import asyncio
import socket

from firezone.runtime import full_tunnel
from firezone.runtime.dns_listen import DnsServer
from firezone.runtime.udp import UdpSockets


def _mark(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, full_tunnel.SO_MARK)


def test_marked_sockets() -> None:
    s = full_tunnel.marked_socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert _mark(s) == full_tunnel.MARK
    finally:
        s.close()
    udp = UdpSockets(0, host4="127.0.0.1", host6="::1", mark=True)
    plain = UdpSockets(0, host4="127.0.0.1", host6="::1")
    try:
        assert [_mark(x) for x in udp.sockets()] == [full_tunnel.MARK] * len(udp.sockets())
        assert {_mark(x) for x in plain.sockets()} == {0}
    finally:
        udp.close()
        plain.close()


def test_dns_forwarding_uses_marked_sockets(monkeypatch) -> None:
    """A query the stub forwards to an upstream over TCP leaves from a marked socket."""
    marked: list[tuple[int, int]] = []
    original = full_tunnel.mark_socket

    def recording(sock: socket.socket) -> bool:
        ok = original(sock)
        marked.append((sock.type, _mark(sock)))
        return ok

    monkeypatch.setattr(full_tunnel, "mark_socket", recording)

    async def scenario() -> bytes:
        async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            n = int.from_bytes(await reader.readexactly(2), "big")
            q = await reader.readexactly(n)
            writer.write(len(q).to_bytes(2, "big") + q)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(upstream, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        dns = DnsServer(lambda *a, **k: None, asyncio.get_running_loop(), mark=True)
        try:
            return await dns._ask_tcp(("127.0.0.1", port), b"\x12\x34query")
        finally:
            dns.close()
            server.close()

    assert asyncio.run(scenario()) == b"\x12\x34query"
    assert marked == [(socket.SOCK_STREAM, full_tunnel.MARK)]
